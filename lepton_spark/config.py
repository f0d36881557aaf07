"""Pipeline configuration: one YAML file, read once into a frozen, validated object.

Every step takes the part of the config it needs (``cfg.train``, ``cfg.shards`` ...), never raw
dicts. Errors name the file and the field (``train.epochs: Input should be greater than 0``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lepton_spark.errors import InputError


class ConfigError(InputError):
    """The pipeline file cannot be used as it is; the message names the file and the field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparkConfig(_Frozen):
    master: str = "local[*]"
    app_name: str | None = None
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = "WARN"
    conf: dict[str, str] = Field(default_factory=dict)

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
    """A synthetic data set made on Spark (see ``lepton_spark.datagen``).

    Fields that do not apply to ``kind`` are ignored by it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    kind: Literal["tabular_classification", "tabular_regression", "digits", "topics", "blobs"] = (
        "tabular_classification"
    )
    """Which data set: see ``lepton_spark.datagen``."""
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
    path: str | None = None
    table: str | None = None
    options: dict[str, str] = Field(default_factory=dict)
    generate: GeneratedSource | None = None

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
    shape: list[int] | None = Field(
        None, description="per-row shape for the model, e.g. [1, 8, 8] (default: [length])"
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or min(shape) <= 0):
            raise ValueError("shape needs positive sizes")
        return shape


class TextConfig(_Frozen):
    """A text column, tokenised on Spark (lower case, split on non-alphanumerics)."""

    name: str
    max_length: int = Field(64, gt=0, description="tokens per row: longer texts are cut")
    max_vocabulary: int = Field(20_000, gt=0, description="the most frequent words kept")
    min_count: int = Field(1, gt=0, description="words seen fewer times are 'unknown'")


class FeatureSpecConfig(_Frozen):
    task: Literal["classification", "regression", "clustering"] = "classification"
    numeric: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)
    arrays: list[ArrayConfig] = Field(default_factory=list)
    text: list[TextConfig] = Field(default_factory=list)
    label: str | None = Field(None, description="the target column (not for clustering)")
    weight: str | None = Field(None, description="sample weight column (training loss)")
    num_classes: int | None = Field(None, ge=2)
    max_categories: int = Field(10_000, gt=0)
    nulls: Literal["fail", "drop", "fill"] = Field(
        "fail",
        description="rows with null/NaN/inf numeric features or a null label: fail the run, drop "
        "the rows, or fill the features with fill_value (a null label cannot be filled)",
    )
    fill_value: float = 0.0
    standardize: bool = Field(
        False,
        description="standardise numeric features with mean and std computed on Spark; the "
        "statistics are stored with the model",
    )

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
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 42


class ShardConfig(_Frozen):
    """How the prepared data is cut into Arrow shards.

    ``random`` (seeded) gives shards equal to within one row; ``hash`` keeps every row of a key in
    one shard; ``range`` gives each shard a contiguous range of the key, rows sorted by it. Size by
    ``rows_per_shard`` or ``bytes_per_shard`` (not both; 250,000 rows when neither is given).
    """

    root: str = Field(".lepton/shards", description="a local path or a pyarrow.fs URI")
    strategy: Literal["random", "hash", "range"] = "random"
    key: str | None = Field(None, description="the column hash and range shard by")
    rows_per_shard: int | None = Field(None, gt=0)
    bytes_per_shard: int | None = Field(None, gt=0)
    seed: int = 0
    skew_warning: float = Field(1.25, gt=1.0, description="warn when a rank gets more × the mean")

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
    num_workers: int = Field(2, gt=0)
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(512, gt=0, description="rows per rank per step")
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, description="learning rate for one rank")
    lr_scaling: Literal["linear", "none"] = "linear"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = Field(
        65_536, gt=0, description="rows mixed at a time across this rank's shards"
    )
    tail: Literal["drop", "pad"] = Field(
        "drop",
        description="equal steps per rank: 'drop' stops every rank at the smallest rank's full "
        "batches; 'pad' runs to the largest rank's, smaller ranks wrapping around their rows",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = Field(
        False,
        description="autocast: bf16 on CPUs and on GPUs that have it, fp16 with a gradient "
        "scaler on older GPUs",
    )
    threads_per_rank: int | None = Field(None, gt=0)
    progress_every_steps: int = Field(
        50,
        gt=0,
        description="rank 0 reports progress and logs the per-step metrics (train_loss_step, "
        "throughput) every N steps",
    )
    checkpoint_root: str = Field(
        ".lepton/checkpoints", description="a path or pyarrow.fs URI; one folder per MLflow run"
    )
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="also checkpoint every N steps (always at each epoch's end)"
    )
    retries: int = Field(
        2, ge=0, description="times a failed training stage is run again, from the checkpoint"
    )
    stall_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="fail the training stage when no rank moves for this long (names the rank)",
    )
    gloo_timeout_s: int = Field(
        120, gt=0, description="Horovod's Gloo rendezvous and connection timeout"
    )
    fault_inject: str | None = Field(
        None,
        pattern=r"^(kill|hang):\d+:\d+$",
        description="testing only: 'kill:RANK:STEP' or 'hang:RANK:STEP' on the first attempt",
    )
    loss: str | None = Field(
        None,
        description="'package.module:function' (outputs, labels, weights or None) -> scalar; "
        "default cross-entropy (classification) or mean squared error (regression)",
    )
    metrics: list[str] = Field(
        default_factory=list,
        description="more validation metrics: 'package.module:function' (outputs, labels) -> a "
        "value per row, averaged over the validation split as val_<function>",
    )
    horovod_cycle_time_ms: float = Field(
        5.0,
        gt=0.0,
        description="Horovod's background cycle (HOROVOD_CYCLE_TIME); its 1 ms default costs a "
        "CPU rank ~10% of a core in idle polling (benchmarks/scaling)",
    )


class ModelConfig(_Frozen):
    name: str = Field(
        "mlp",
        description="mlp | linear | cnn | transformer | kmeans, or 'package.module:function' "
        "(a factory taking the feature spec and the options, returning an nn.Module)",
    )
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    embedding_dim: int = Field(8, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(
        default_factory=dict, description="more arguments for the model (see lepton_spark.models)"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        builtin = ("mlp", "linear", "cnn", "transformer", "kmeans")
        if name not in builtin and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
            raise ValueError(
                f"unknown model {name!r}: one of {', '.join(builtin)}, or 'package.module:function'"
            )
        return name


class BaselineConfig(_Frozen):
    """Spark MLlib trained on the same split, logged beside the neural model's metrics."""

    mllib: bool = Field(
        False,
        description="logistic regression (classification), linear regression (regression) or "
        "k-means (clustering) with Spark MLlib",
    )
    max_iter: int = Field(100, gt=0)


class TrackingConfig(_Frozen):
    tracking_uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    local_store: str = "mlruns-data"
    registered_model: str | None = Field(
        None, description="register each trained model under this name, alias 'candidate'"
    )
    promote_metric: str = Field("val_accuracy", description="what 'lepton-spark promote' compares")
    promote_mode: Literal["max", "min"] = "max"
    system_metrics_interval_s: float | None = Field(
        10.0,
        gt=0.0,
        description="sample CPU, memory (GPU with nvidia-ml-py) on the driver's host this often, "
        "as MLflow system metrics; null turns them off",
    )


class CompressConfig(_Frozen):
    """An optional step after training: a smaller, faster copy of the model, registered as a
    version of its own (tagged with what was done) beside the trained one."""

    quantize: bool = Field(False, description="dynamic int8 quantization of the Linear layers")
    prune: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="magnitude pruning: this share of the Linear weights (smallest |w|) set to 0",
    )
    eval_rows: int = Field(
        500_000, gt=0, description="validation rows both models are scored on (on the driver)"
    )
    latency_batch: int = Field(512, gt=0, description="rows per batch in the CPU latency test")

    @property
    def enabled(self) -> bool:
        return self.quantize or self.prune is not None

    @property
    def method(self) -> str:
        parts = [f"prune{self.prune:g}"] if self.prune is not None else []
        return "+".join([*parts, *(["int8"] if self.quantize else [])])


class PipelineConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    spark: SparkConfig = Field(default_factory=SparkConfig)
    sources: dict[str, SourceConfig]
    transform: str | None = Field(None, description="Spark SQL over the source views")
    features: FeatureSpecConfig
    split: SplitConfig = Field(default_factory=SplitConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)

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
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]

    def training_fingerprint(self) -> str:
        """A hash of what decides the trained model (data, features, split, shards, model, the
        training settings); not where it runs, how it is tracked or how failures are handled.

        A run key resumes an unfinished run only when this is unchanged.
        """
        operational = {
            "retries",
            "fault_inject",
            "stall_timeout_s",
            "gloo_timeout_s",
            "progress_every_steps",
            "threads_per_rank",
            "horovod_cycle_time_ms",
            "checkpoint_root",
            "device",
        }
        dump = self.model_dump(
            mode="json", exclude={"spark", "tracking", "description", "compress", "baseline"}
        )
        dump["train"] = {k: v for k, v in dump["train"].items() if k not in operational}
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: Mapping[str, Any]) -> PipelineConfig:
        """A new config with dotted keys replaced (``{"train.epochs": 5}``), validated again."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        return _validate(data, source="overrides")


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _flatten(sub, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), json.dumps(value) if not isinstance(value, str) else value


# Free-form mappings whose keys contain dots themselves (Spark conf keys, reader options): in an
# override, everything after them is one key (``spark.conf.spark.sql.shuffle.partitions=8``).
_DOTTED_KEY_SECTIONS = ("conf", "options")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    while len(parts) > 1:
        part = parts.pop(0)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
        if part in _DOTTED_KEY_SECTIONS:
            parts = [".".join(parts)]
    node[parts[0]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.01"`` -> ``("train.lr", 0.01)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(raw)


def _validate(data: Any, source: str) -> PipelineConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {where}: {e['msg']}")
        raise ConfigError(f"{source}: invalid pipeline config\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML file, applying dotted-key overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and overrides:
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
    return _validate(data, source=str(path))
