"""The pipeline file's schema: one frozen, validated pydantic model per section.

Every step takes the part of the config it needs (``cfg.train``, ``cfg.shards`` ...), never raw
dicts. Each field's docstring is its description in ``docs/config-reference.md``, which
``scripts/config_reference.py`` generates from these classes (a test keeps it up to date).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lepton_spark.names import VAL_ACCURACY
from lepton_spark.redact import redact_tree


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SparkConfig(_Frozen):
    """Where the ETL and the barrier stage run (a session that is already active wins)."""

    master: str = "local[*]"
    """Spark master URL (``--master`` overrides it)."""
    remote: str | None = Field(None, pattern=r"^sc://")
    """A Spark Connect server, ``sc://HOST:PORT`` (``--remote`` and ``SPARK_REMOTE`` set it too):
    the session is a Connect client and ``master`` is the server's business."""
    events_host: str | None = None
    """The address the ranks reach this process's event channel at (default: ``spark.driver.host``,
    or on Spark Connect the address this client reaches the server from)."""
    app_name: str | None = None
    """Spark application name (default ``lepton-spark <pipeline name>``)."""
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"
    """Spark's log level on the driver."""
    conf: dict[str, str] = Field(default_factory=dict)
    """Any Spark configuration (``spark.sql.shuffle.partitions: 8``); values become strings."""
    properties_file: str | None = None
    """A Spark properties file (``key value`` lines, as ``spark-submit --properties-file``)
    applied to a session lepton-spark starts, under ``conf``: where a cluster's secret goes
    (``lepton-spark cluster up`` writes one), so it is in no config, tag or command line."""

    @model_validator(mode="before")
    @classmethod
    def _conf_values_as_strings(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("conf"), Mapping):
            conf = {
                k: (str(v).lower() if isinstance(v, bool) else str(v))
                for k, v in data["conf"].items()
            }
            data = {**data, "conf": conf}
        return data


class GeneratedSource(_Frozen):
    """A synthetic data set made on Spark (see ``lepton_spark.data.datagen``).

    Fields that do not apply to ``kind`` are ignored by it.
    """

    kind: Literal["tabular_classification", "tabular_regression", "digits", "topics", "blobs"] = (
        "tabular_classification"
    )
    """Which data set: see ``lepton_spark.data.datagen``."""
    rows: int = Field(1_000_000, gt=0)
    """Number of rows (ignored by ``digits``, which always has its 1,797 images)."""
    seed: int = 7
    """Every value is a function of ``seed`` and the row id (``digits`` ignores it)."""
    label_noise: float = Field(0.08, ge=0.0, lt=0.5)
    """tabular_classification, topics: probability that a label is replaced by a random one."""
    partitions: int | None = Field(None, gt=0)
    """Spark partitions of the table (default: the default parallelism, at least 2)."""
    target_noise: float = Field(0.5, ge=0.0)
    """tabular_regression: standard deviation of the Gaussian noise added to the target."""
    clusters: int = Field(8, ge=2, le=64)
    """blobs: number of Gaussian clusters."""
    dims: int = Field(10, ge=1, le=256)
    """blobs: number of feature columns ``f0..f{dims-1}``."""
    cluster_std: float = Field(1.0, gt=0.0)
    """blobs: standard deviation of every cluster, in each dimension."""
    vocabulary: int = Field(2000, ge=50)
    """topics: number of distinct words (half shared by all topics, half split among topics)."""
    min_words: int = Field(8, ge=1)
    """topics: fewest words in a document."""
    max_words: int = Field(40, ge=1)
    """topics: most words in a document (at least ``min_words``)."""
    topics: int = Field(4, ge=2, le=20)
    """topics: number of topics (the labels are 0..topics-1)."""

    @model_validator(mode="after")
    def _word_range(self) -> GeneratedSource:
        if self.max_words < self.min_words:
            raise ValueError(
                f"max_words ({self.max_words}) must be at least min_words ({self.min_words})"
            )
        return self


class SourceConfig(_Frozen):
    """One input, registered as a temporary view under its key in ``sources``.

    Exactly one of ``generate``, ``path`` (with ``format``) or ``table``.
    """

    format: str = "parquet"
    """Spark data source format of ``path`` (parquet, csv, json, orc, delta...)."""
    path: str | None = None
    """A file, folder or glob on any Hadoop filesystem (``s3a://``, ``hdfs://``, local)."""
    table: str | None = None
    """A table in Spark's catalog (``db.name``)."""
    options: dict[str, str] = Field(default_factory=dict)
    """Reader options (``header: "true"``, ``inferSchema: "true"``)."""
    generate: GeneratedSource | None = None
    """A generated data set instead of a path or table."""

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> SourceConfig:
        given = [k for k in ("path", "table", "generate") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'path', 'table' or 'generate' (got {given or 'none'})"
            )
        return self


class ArrayConfig(_Frozen):
    """A column of fixed-length numeric arrays (``array<…>`` or a Spark ML vector)."""

    name: str
    """The column."""
    shape: list[int] | None = None
    """Per-row shape for the model, e.g. ``[1, 8, 8]`` (default: ``[length]``)."""

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or min(shape) <= 0):
            raise ValueError("shape needs positive sizes")
        return shape


class TextConfig(_Frozen):
    """A text column, tokenised on Spark (lower case, split on non-alphanumerics)."""

    name: str
    """The column."""
    max_length: int = Field(64, gt=0)
    """Tokens per row: longer texts are cut, shorter ones padded."""
    max_vocabulary: int = Field(20_000, gt=0)
    """The most frequent words kept."""
    min_count: int = Field(1, gt=0)
    """Words seen fewer times are 'unknown'."""
    tokenizer: str | None = None
    """A Hugging Face fast tokenizer (a ``save_pretrained`` folder: path or object-store URI):
    the text is tokenised with it on the executors (its special tokens, cut or padded with its
    pad id to ``max_length``) instead of lower-cased words and a vocabulary. Set for you to
    ``model.pretrained`` with model ``hf``."""


class FeatureSpecConfig(_Frozen):
    """Which columns of the transform's output are features, label and weight."""

    task: Literal["classification", "regression", "clustering"] = "classification"
    """What the model learns: classes, a number, or clusters (model ``kmeans``)."""
    numeric: list[str] = Field(default_factory=list)
    """Numeric feature columns."""
    categorical: list[str] = Field(default_factory=list)
    """Categorical columns (strings, integers, booleans, dates), indexed on Spark."""
    arrays: list[ArrayConfig] = Field(default_factory=list)
    """Fixed-length array or Spark ML vector columns."""
    text: list[TextConfig] = Field(default_factory=list)
    """Text columns, tokenised on Spark."""
    label: str | None = None
    """The target column (not for clustering)."""
    weight: str | None = None
    """Sample weight column (weighs the training loss)."""
    num_classes: int | None = Field(None, ge=2)
    """Classification: the number of classes (default: the largest label + 1)."""
    max_categories: int = Field(10_000, gt=0)
    """The most frequent values kept per categorical column; the rest become 'unknown'."""
    nulls: Literal["fail", "drop", "fill"] = "fail"
    """Rows with null/NaN/inf numeric features or a null label: fail the run, drop the rows, or
    fill the features with ``fill_value`` (a null label cannot be filled)."""
    fill_value: float = 0.0
    """What a missing number becomes under ``nulls: fill`` (and, for such a model, in scoring:
    filled before standardisation, as in training)."""
    standardize: bool | None = None
    """Standardise numeric features with mean and std computed on Spark; the statistics are
    stored with the model. Default (null): on for mlp, cnn, transformer and a user's factory,
    off for linear and kmeans (docs/pipelines.md has the figures); the value used is in the run's
    params."""

    @model_validator(mode="after")
    def _columns_distinct(self) -> FeatureSpecConfig:
        if not (self.numeric or self.categorical or self.arrays or self.text):
            raise ValueError("name at least one numeric, categorical, array or text column")
        if self.task != "clustering" and self.label is None:
            raise ValueError(f"a {self.task} pipeline needs a 'label' column")
        if self.task != "classification" and self.num_classes is not None:
            raise ValueError("num_classes is for classification")
        columns = [
            *self.numeric,
            *self.categorical,
            *(a.name for a in self.arrays),
            *(t.name for t in self.text),
            *([self.label] if self.label else []),
            *([self.weight] if self.weight else []),
        ]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"columns used twice: {repeated}")
        return self


class SplitConfig(_Frozen):
    """The seeded train/validation split."""

    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the rows held out for validation."""
    seed: int = 42
    """Seed of the split (a hash of each row's values and the seed): the same rows and seed, the
    same split, whatever the partitioning."""


class ShardConfig(_Frozen):
    """How the prepared data is cut into Arrow shards.

    ``random`` writes every Spark partition where it is (no exchange, rows shuffled inside each
    batch) and leaves balance to the reader: every epoch each rank is dealt an equal number of
    rows, a seeded selection of row blocks from all files (``train.seed``, new every epoch).
    ``hash`` keeps every row of a key in one shard; ``range`` gives each shard a contiguous range
    of the key, rows sorted by it (both: one exchange, whole shards per rank). Size by
    ``rows_per_shard`` or ``bytes_per_shard`` (not both; 250,000 rows when neither is given).
    """

    root: str = ".lepton/shards"
    """Where shard folders go: a local path or a ``pyarrow.fs`` URI (``s3://``, ``hdfs://``)."""
    strategy: Literal["random", "hash", "range"] = "random"
    """random (no exchange; equal rows per rank, dealt afresh every epoch) | hash (a key's rows in
    one shard) | range (ordered)."""
    key: str | None = None
    """The column ``hash`` and ``range`` shard by."""
    rows_per_shard: int | None = Field(None, gt=0)
    """Rows per shard file: ``random``, at most this many (a partition's rows roll over to a new
    file); ``hash``/``range``, the number of shards (rounded to a multiple of the ranks)."""
    bytes_per_shard: int | None = Field(None, gt=0)
    """Bytes per shard file, from the fixed row width (instead of ``rows_per_shard``)."""
    seed: int = 0
    """Seed of the random strategy's row order inside each file (the reader's deal of rows to
    ranks follows ``train.seed``)."""
    skew_warning: float = Field(1.25, gt=1.0)
    """Warn when a rank gets more than this × the mean training rows."""
    keep: int = Field(5, ge=1)
    """Committed shard folders kept per pipeline name under ``root``: when a new one is written,
    the oldest beyond this many are removed (``lepton-spark shards gc`` does it on demand)."""
    compression: Literal["none", "lz4", "zstd"] = "none"
    """Arrow IPC buffer compression of the shard files: none (read in place, zero copy) | lz4 |
    zstd (fewer bytes, for object stores where bytes cost more than CPU; each batch is
    decompressed as it is read)."""

    @model_validator(mode="after")
    def _key_and_size(self) -> ShardConfig:
        if self.strategy == "random" and self.key is not None:
            raise ValueError("'key' is only used by the hash and range strategies")
        if self.strategy != "random" and self.key is None:
            raise ValueError(f"strategy {self.strategy!r} needs a 'key' column")
        if self.rows_per_shard is not None and self.bytes_per_shard is not None:
            raise ValueError("give 'rows_per_shard' or 'bytes_per_shard', not both")
        return self

    def target_rows(self, row_bytes: int) -> int:
        """Rows per shard, from ``rows_per_shard`` or ``bytes_per_shard`` and the row width."""
        if self.bytes_per_shard is not None:
            return max(1, self.bytes_per_shard // row_bytes)
        return self.rows_per_shard or 250_000


class TrainConfig(_Frozen):
    """The barrier stage's ranks and how they train."""

    num_workers: int = Field(2, gt=0)
    """Ranks: one barrier task, one process, one rank of the engine each."""
    backend: Literal["horovod", "ddp", "fsdp"] = "horovod"
    """The data-parallel engine: ``horovod`` (Gloo on CPU, NCCL on GPU), ``ddp`` (torch's
    DistributedDataParallel) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state
    sharded over the ranks, for models that outgrow one); ``ddp``/``fsdp`` use gloo on CPU,
    NCCL on GPU, and need no Horovod build."""
    epochs: int = Field(3, gt=0)
    """Passes over the training split (k-means: the most Lloyd iterations)."""
    batch_size: int = Field(512, gt=0)
    """Rows per rank per step (per micro-batch with ``accumulate_steps``)."""
    accumulate_steps: int = Field(1, gt=0)
    """Gradient accumulation: the ranks average their gradients and step once every N batches
    (Horovod's ``backward_passes_per_step``, DDP's ``no_sync``, FSDP's gradient sync switched
    off in between): N times fewer allreduces, an effective batch of
    ``batch_size`` × N × ranks."""
    compression: Literal["none", "fp16", "bf16"] = "none"
    """Gradients sent between ranks in 16 bits: Horovod's ``Compression.fp16`` (no bf16), DDP's
    fp16/bf16 communication hooks. Not for ``fsdp``, whose reduce dtype follows
    ``mixed_precision``."""
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    """The torch optimizer (Horovod: wrapped in its ``DistributedOptimizer``)."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate for one rank."""
    lr_scaling: Literal["linear", "none"] = "linear"
    """``linear``: ``lr`` × ranks × ``accumulate_steps`` (a step averages that many batches)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Per-step schedule: constant, or cosine decay to zero over the run."""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD momentum."""
    weight_decay: float = Field(0.0, ge=0.0)
    """The optimizer's weight decay."""
    seed: int = 0
    """Model initialisation, shuffling and k-means seeding."""
    shuffle: bool = True
    """Shuffle every epoch (seeded by ``seed`` and the epoch)."""
    shuffle_buffer: int = Field(65_536, gt=0)
    """Rows mixed at a time across the record batches this rank reads."""
    tail: Literal["drop", "pad"] = "drop"
    """Equal steps per rank: ``drop`` stops every rank at the smallest rank's full batches;
    ``pad`` runs to the largest rank's, smaller ranks wrapping around their rows (with the
    ``random`` strategy every rank has the same rows: ``pad`` only completes the last batch)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: a GPU when Spark assigns one; ``cuda``: a missing GPU is an error at once."""
    mixed_precision: bool = False
    """autocast: bf16 on CPUs and on GPUs that have it, fp16 with a gradient scaler on older
    GPUs."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute the block's forward in
    the backward pass (``torch.utils.checkpoint``, non-reentrant; every engine): the Transformer's
    encoder layers, the CNN's conv blocks, an ``hf`` model's layers (its own gradient
    checkpointing). What it saves: the activations inside the blocks, which grow with the batch
    and which FSDP does not shard; what it costs: a second forward of each block, roughly +30%
    step time. Training only (evaluation and scoring run as without it); what is trained is the
    same (run keys ignore it). Not for mlp, linear or kmeans, which have no blocks."""
    threads_per_rank: int | None = Field(None, gt=0)
    """torch threads per rank (default: the CPUs the rank may use (affinity, cgroup quota) ÷ the
    ranks on the host, at most ``spark.task.cpus``)."""
    progress_every_steps: int = Field(50, gt=0)
    """Rank 0 reports progress and logs the per-step metrics (``train/loss_step``,
    ``train/throughput_samples_per_second``) every N steps."""
    checkpoint_root: str = ".lepton/checkpoints"
    """A path or ``pyarrow.fs`` URI; one folder per MLflow run."""
    checkpoint_every_steps: int | None = Field(None, gt=0)
    """Also checkpoint every N steps (always at each epoch's end; with ``accumulate_steps``, at
    the first optimizer step that ends past each multiple of N)."""
    retries: int = Field(2, ge=0)
    """Times a failed training stage is run again, from the checkpoint."""
    min_workers: int | None = Field(None, gt=0)
    """Elastic resume: a retry that finds fewer slots than ``num_workers`` (an executor lost for
    good) but at least this many goes on from the checkpoint with the ranks it can get (the
    shards spread over them, the learning rate scaled for their number). Default: ``num_workers``
    (a retry waits for all of them)."""
    stall_timeout_s: float = Field(300.0, gt=0.0)
    """Fail the training stage when no rank moves for this long (names the rank)."""
    gloo_timeout_s: int = Field(120, gt=0)
    """The rendezvous and connection timeout (Horovod's Gloo, torch.distributed's process group)."""
    fault_inject: str | None = Field(None, pattern=r"^(kill|hang):\d+:\d+$")
    """Testing only: ``kill:RANK:STEP`` or ``hang:RANK:STEP`` on the first attempt."""
    loss: str | None = None
    """``package.module:function`` (outputs, labels, weights or None) → a scalar; default
    cross-entropy (classification) or mean squared error (regression)."""
    metrics: list[str] = Field(default_factory=list)
    """More validation metrics: ``package.module:function`` (outputs, labels) → a value per
    row, averaged over the validation split as ``val/<function>``."""
    horovod_cycle_time_ms: float = Field(5.0, gt=0.0)
    """Horovod's background cycle (``HOROVOD_CYCLE_TIME``); its 1 ms default costs a CPU rank
    ~10% of a core in idle polling (``benchmarks/scaling``)."""
    warm_ranks: bool = True
    """Fork each rank from a warm process per executor with torch already imported (started by
    the first stage, gone when the executor is or after 15 idle minutes) instead of starting a
    fresh interpreter: 2-3 s less launch per stage. ``false``: a fresh interpreter every time."""

    # Fields added after runs were keyed: at these values they leave a run key's fingerprint as
    # it was before them, so an unfinished run of an older version still resumes.
    ADDED_DEFAULTS: ClassVar[dict[str, Any]] = {
        "backend": "horovod",
        "accumulate_steps": 1,
        "compression": "none",
    }

    # Fields that decide how a run is carried out, not what it trains (run keys ignore them).
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset(
        {
            "retries",
            "min_workers",
            "fault_inject",
            "stall_timeout_s",
            "gloo_timeout_s",
            "progress_every_steps",
            "threads_per_rank",
            "horovod_cycle_time_ms",
            "checkpoint_root",
            "device",
            "warm_ranks",
            "activation_checkpointing",
        }
    )

    @model_validator(mode="after")
    def _engine_options(self) -> TrainConfig:
        if self.compression != "none" and self.backend == "fsdp":
            raise ValueError(
                "train.compression does not apply to train.backend 'fsdp' (its gradients are "
                "reduced in the precision train.mixed_precision sets): leave it 'none'"
            )
        if self.compression == "bf16" and self.backend == "horovod":
            raise ValueError(
                "train.compression 'bf16' needs train.backend 'ddp': Horovod compresses to "
                "fp16 only"
            )
        return self

    @model_validator(mode="after")
    def _min_workers(self) -> TrainConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"train.min_workers ({self.min_workers}) is more than train.num_workers "
                f"({self.num_workers})"
            )
        return self


class ModelConfig(_Frozen):
    """The network (``lepton_spark.models``)."""

    name: str = "mlp"
    """``mlp`` | ``linear`` | ``cnn`` | ``transformer`` | ``kmeans`` | ``hf``, or
    ``package.module:function`` (a factory taking the feature spec and the options, returning an
    ``nn.Module``)."""
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    """Hidden layer widths (mlp, the cnn's head)."""
    embedding_dim: int = Field(8, gt=0)
    """Width of each categorical feature's embedding (mlp)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout after each hidden layer (mlp, cnn, transformer)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """More arguments for the model (see ``lepton_spark.models``)."""
    pretrained: str | None = None
    """Model ``hf``: the pretrained Hugging Face model to fine-tune, a folder saved with
    ``save_pretrained`` (config, weights, a fast tokenizer), as a path or an object-store URI
    every rank reaches; never fetched from the hub."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        builtin = ("mlp", "linear", "cnn", "transformer", "kmeans", "hf")
        if name not in builtin and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            raise ValueError(
                f"unknown model {name!r}: one of {', '.join(builtin)}, or 'package.module:function'"
            )
        return name


class BaselineConfig(_Frozen):
    """Spark MLlib trained on the same split, logged beside the neural model's metrics."""

    mllib: bool = False
    """Logistic regression (classification), linear regression (regression) or k-means
    (clustering) with Spark MLlib, logged as ``mllib/*``."""
    max_iter: int = Field(100, gt=0)
    """MLlib's ``maxIter``."""


class TrackingConfig(_Frozen):
    """Where the MLflow run goes and what the registry does with its model."""

    tracking_uri: str | None = None
    """MLflow tracking URI (``--tracking-uri`` and ``MLFLOW_TRACKING_URI`` win; default: the
    local store)."""
    experiment: str | None = None
    """MLflow experiment (default: the pipeline's name)."""
    run_name: str | None = None
    """MLflow run name (default ``<pipeline>-<run key or start time>``)."""
    local_store: str = "mlruns-data"
    """The embedded default store: sqlite ``mlflow.db`` and ``artifacts/`` under this folder."""
    registered_model: str | None = None
    """Register each trained model under this name, alias ``candidate``."""
    promote_metric: str = VAL_ACCURACY
    """What ``lepton-spark promote`` compares (runs logged with the old names, such as
    ``val_accuracy``, are read too)."""
    promote_mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller ``promote_metric`` is better."""
    system_metrics_interval_s: float | None = Field(10.0, gt=0.0)
    """Sample CPU, memory (GPU with nvidia-ml-py) on the driver's host this often, as MLflow
    system metrics; null turns them off."""


class CompressConfig(_Frozen):
    """An optional step after training: a smaller, faster copy of the model, registered as a
    version of its own (tagged with what was done) beside the trained one."""

    quantize: bool = False
    """Dynamic int8 quantization of the Linear layers."""
    prune: float | None = Field(None, gt=0.0, lt=1.0)
    """Magnitude pruning: this share of the Linear weights (smallest ``|w|``) set to 0."""
    eval_rows: int = Field(500_000, gt=0)
    """Validation rows both models are scored on (on the driver)."""
    latency_batch: int = Field(512, gt=0)
    """Rows per batch in the CPU latency test."""

    @property
    def enabled(self) -> bool:
        return self.quantize or self.prune is not None

    @property
    def method(self) -> str:
        parts = [f"prune{self.prune:g}"] if self.prune is not None else []
        return "+".join([*parts, *(["int8"] if self.quantize else [])])


def default_standardize(model: str) -> bool:
    """``features.standardize`` unless set: on for the networks (mlp, cnn, transformer, a user
    factory), which train worse on features of unequal scales; off for k-means, whose distances
    (and the MLlib baseline's cost) are in the units given, and for linear, which did better
    without it on the demo table (val/accuracy 0.7334 against 0.7288, mean of 3 seeds; see
    docs/pipelines.md). With it off, a numeric feature whose standard deviation is above 100 is
    named in a warning."""
    return model not in ("kmeans", "linear")


class PipelineConfig(_Frozen):
    """One workload: its sources and SQL, features, split, shards, training, model, tracking."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The pipeline's name: MLflow experiment, shard folder prefix."""
    description: str = ""
    """One line for people (printed when the run starts)."""
    spark: SparkConfig = Field(default_factory=SparkConfig)
    """Spark session settings."""
    sources: dict[str, SourceConfig]
    """Input views by name."""
    transform: str | None = None
    """Spark SQL over the source views (feature engineering, joins, filters)."""
    features: FeatureSpecConfig
    """Features, label and weight."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """The train/validation split."""
    shards: ShardConfig = Field(default_factory=ShardConfig)
    """Arrow shards."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The ranks and how they train."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow and the registry."""
    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Optional compressed variant."""
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    """Optional Spark MLlib baseline."""

    @model_validator(mode="before")
    @classmethod
    def _standardize_default(cls, data: Any) -> Any:
        """``features.standardize`` left out (or null) follows the model: default_standardize."""
        if not isinstance(data, Mapping):
            return data
        features, model = data.get("features"), data.get("model")
        name = "mlp"
        if isinstance(model, Mapping):
            name = str(model.get("name", name))
        elif isinstance(model, ModelConfig):
            name = model.name
        if isinstance(features, Mapping) and features.get("standardize") is None:
            features = {**features, "standardize": default_standardize(name)}
        elif isinstance(features, FeatureSpecConfig) and features.standardize is None:
            features = features.model_copy(update={"standardize": default_standardize(name)})
        else:
            return data
        return {**data, "features": features}

    @model_validator(mode="after")
    def _hf_tokenizer(self) -> PipelineConfig:
        """Model ``hf``: its text features are tokenised with its own tokenizer unless told."""
        if self.model.name != "hf" or not self.model.pretrained:
            return self
        texts = [
            t if t.tokenizer else t.model_copy(update={"tokenizer": self.model.pretrained})
            for t in self.features.text
        ]
        if texts != list(self.features.text):
            features = self.features.model_copy(update={"text": texts})
            object.__setattr__(self, "features", features)
        return self

    @model_validator(mode="after")
    def _sources_and_transform(self) -> PipelineConfig:
        if not self.sources:
            raise ValueError("'sources' needs at least one source")
        if self.transform is None and len(self.sources) > 1:
            raise ValueError("several sources need a 'transform' (Spark SQL) that combines them")
        for view in self.sources:
            if not view.isidentifier():
                raise ValueError(f"source name {view!r} must be a valid SQL view name")
        clustering = self.features.task == "clustering"
        if clustering != (self.model.name == "kmeans"):
            raise ValueError(
                "clustering pipelines use model 'kmeans', and model 'kmeans' is for clustering "
                f"(features.task is {self.features.task!r}, model.name {self.model.name!r})"
            )
        if self.train.backend == "fsdp" and self.model.name == "kmeans":
            raise ValueError(
                "train.backend 'fsdp' shards a model's parameters and k-means has none to shard: "
                "use 'horovod' or 'ddp'"
            )
        if self.train.activation_checkpointing and self.model.name in ("mlp", "linear", "kmeans"):
            raise ValueError(
                f"train.activation_checkpointing recomputes a model's blocks in the backward pass "
                f"and model {self.model.name!r} has none (cnn, transformer and hf have): turn it "
                "off"
            )
        if self.model.name == "hf" and not (self.model.pretrained and self.features.text):
            raise ValueError(
                "model 'hf' fine-tunes model.pretrained (a save_pretrained folder) over a text "
                "feature (features.text): set both"
            )
        if self.model.name != "hf" and self.model.pretrained:
            raise ValueError(f"model.pretrained is for model 'hf', not {self.model.name!r}")
        if self.model.name == "hf" and self.compress.quantize:
            raise ValueError("compress.quantize does not apply to model 'hf'")
        if self.compress.enabled and self.features.task != "classification":
            raise ValueError("compress is measured by accuracy: classification models only")
        if self.compress.quantize and self.model.name == "transformer":
            raise ValueError(
                "compress.quantize does not apply to model 'transformer' (torch's fused encoder "
                "needs float Linear layers); compress.prune does"
            )
        f = self.features
        if clustering and (not f.numeric or f.categorical or f.arrays or f.text or f.weight):
            raise ValueError(
                "k-means clusters numeric features only: list them in features.numeric, and no "
                "categorical, arrays, text or weight"
            )
        if self.baseline.mllib and not (f.numeric or f.categorical):
            raise ValueError(
                "baseline.mllib trains Spark MLlib on numeric and categorical features; this "
                "pipeline has none"
            )
        return self

    def flat(self) -> dict[str, str]:
        """The config as ``section.key -> value`` strings (for MLflow params)."""
        return dict(_flatten(self.model_dump(mode="json")))

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of the named sections (all of them when none are named)."""
        dump = self.model_dump(mode="json", include=set(sections) if sections else None)
        return _digest(dump)

    def training_fingerprint(self) -> str:
        """A hash of what decides the trained model (data, features, split, shards, model, the
        training settings); not where it runs, how it is tracked or how failures are handled.

        A run key resumes an unfinished run only when this is unchanged.
        """
        dump = self.model_dump(
            mode="json", exclude={"spark", "tracking", "description", "compress", "baseline"}
        )
        dump["train"] = {
            k: v
            for k, v in dump["train"].items()
            if k not in TrainConfig.OPERATIONAL and TrainConfig.ADDED_DEFAULTS.get(k, ...) != v
        }
        if dump["model"].get("pretrained") is None:  # added in 0.3: older run keys still match
            dump["model"].pop("pretrained", None)
        for text in dump["features"]["text"]:
            if text.get("tokenizer") is None:
                text.pop("tokenizer", None)
        dump["shards"].pop("keep")  # housekeeping, not the model
        dump["shards"].pop("compression")  # how the same rows are stored, not which
        return _digest(dump)

    def with_overrides(self, overrides: Mapping[str, Any]) -> PipelineConfig:
        """A new config with dotted keys replaced (``{"train.epochs": 5}``), validated again."""
        from lepton_spark.config.loading import apply_overrides, validate

        return validate(apply_overrides(self.model_dump(mode="json"), overrides), "overrides")


def _digest(dump: Any) -> str:
    """Over the redacted config: a hash published as a tag must not let anyone test guesses of
    a password in it (so configs that differ only in a secret hash alike)."""
    return hashlib.sha256(json.dumps(redact_tree(dump), sort_keys=True).encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), json.dumps(value) if not isinstance(value, str) else value
