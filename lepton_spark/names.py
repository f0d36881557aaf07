"""The name of everything a run records in MLflow: tags, metrics, artifacts, registry aliases.

Written once here, used everywhere (the ranks name their metrics with these too, so the history
a rank returns, the MLflow run and ``PipelineResult.metrics`` agree). Metric names carry a
prefix before ``/`` so that the MLflow UI groups them into sections, as it does for its own
``system/*``: ``train/`` and ``val/`` (the learning curves), ``time/``, ``skew/``, ``data/``,
``compress/``, ``mllib/``.

Runs logged before 0.2 used flat names (``val_accuracy``, ``time_etl_s``); :func:`legacy` gives
the old name of a metric so that ``promote`` and the run-key logic still read such runs, and
:func:`current` turns an old name a user still writes (``promote_metric: val_accuracy``) into
the new one. Pure constants and string functions: importable by the ranks.
"""

from __future__ import annotations

# -- tags ------------------------------------------------------------------------------------------
TAG_VERSION = "lepton_spark.version"
TAG_PIPELINE = "pipeline"
TAG_PIPELINE_HASH = "pipeline.hash"  # the whole config
TAG_CONFIG_HASH = "pipeline.config_hash"  # what decides the trained model
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_VERSIONS_PREFIX = "versions."  # versions.torch, versions.pyspark, ...
TAG_RUN_KEY = "lepton.run_key"
TAG_ERROR = "error"
TAG_ROWS_PREFIX = "rows."  # rows.train, rows.validation
TAG_NUM_WORKERS = "num_workers"
TAG_SHARDS = "shards"
TAG_SHARDS_REUSED = "shards.reused"
TAG_SHARDS_STRATEGY = "shards.strategy"
TAG_DATASET_FINGERPRINT = "dataset.fingerprint"
TAG_RANKS_DEVICE = "ranks.device"
TAG_RANKS_PRECISION = "ranks.precision"
TAG_RANKS_CODE = "ranks.code"  # where the ranks imported lepton_spark from
TAG_ATTEMPTS = "training.attempts"
TAG_RANKS_PER_ATTEMPT = "training.ranks"  # "2,1": an elastic retry went on with fewer ranks
TAG_MODEL_URI = "model_uri"
TAG_REGISTRY_MODEL = "registry.model"
TAG_REGISTRY_VERSION = "registry.version"
TAG_COMPRESSION = "compression"
TAG_COMPRESSED_MODEL_URI = "compressed_model_uri"
TAG_TRANSFORMERS_MODEL_URI = "transformers_model_uri"  # model hf: the transformers flavor
TAG_REGISTRY_COMPRESSED_VERSION = "registry.compressed_version"
TAG_BASELINE = "baseline"
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent
TAG_SEARCH = "lepton.search"  # a parameter search's parent run: how many candidates
DATASET_CONTEXT = "training"  # the dataset input's mlflow.data.context
INPUT_VIEW_PREFIX = "lepton_input_"  # TorchEstimator.fit's DataFrame, as a temporary view

# Model version tags (the registry).
VERSION_TAG_COMPRESSION = "lepton.compression"
VERSION_TAG_COMPRESSED_FROM = "lepton.compressed_from"
VERSION_TAG_METRIC_PREFIX = "metrics."  # a version's own metric, where it differs from its run's

# Registry aliases.
CANDIDATE = "candidate"
CHAMPION = "champion"

# -- metrics ---------------------------------------------------------------------------------------
# While training (rank 0, every train.progress_every_steps steps, at the global step).
TRAIN_LOSS_STEP = "train/loss_step"
TRAIN_THROUGHPUT = "train/throughput_samples_per_second"
# Per epoch (the ranks' allreduced values, at the epoch).
TRAIN_LOSS = "train/loss"
TRAIN_SAMPLES_PER_SECOND = "train/samples_per_second"
TRAIN_EPOCH_SECONDS = "train/epoch_seconds"
TRAIN_RANKS = "train/ranks"  # per attempt (step = the attempt, from 0)
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"
VAL_MSE = "val/mse"
VAL_MAE = "val/mae"
VAL_R2 = "val/r2"
VAL_PREFIX = "val/"  # + a user metric's function name
# k-means, per iteration and at the end.
TRAIN_COST = "train/cost"
TRAIN_CENTROID_SHIFT = "train/centroid_shift"
TRAIN_EMPTY_CLUSTERS = "train/empty_clusters"
TRAIN_ITERATIONS = "train/iterations"
VAL_COST_PER_ROW = "val/cost_per_row"
# Once, at step 0.
TIME_PREFIX = "time/"  # time/<stage>_s: etl, shards, training, model_logging, ...
SKEW_PREFIX = "skew/"  # skew/<split>_<shard|rank>_max_over_mean
DATA_PREFIX = "data/"  # data/bad_values.<column>, data/rows_dropped, data/rows_filled
MLLIB_PREFIX = "mllib/"  # mllib/<metric>, mllib/train_seconds
EVENTS_DROPPED_PREFIX = "events/dropped_"  # + reason: what the event channel refused, per stage
COMPRESS_MODEL_SIZE = "compress/model_size_bytes"
COMPRESS_MODEL_LATENCY = "compress/model_latency_ms_per_batch"
COMPRESS_SIZE = "compress/size_bytes"
COMPRESS_LATENCY = "compress/latency_ms_per_batch"
COMPRESS_VAL_ACCURACY = "compress/val_accuracy"
COMPRESS_ACCURACY_COST = "compress/accuracy_cost"

# What a finished run's result is read back as (run keys), in this order.
FINAL_METRICS = (
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_ACCURACY,
    VAL_MSE,
    VAL_MAE,
    VAL_R2,
    TRAIN_COST,
    TRAIN_SAMPLES_PER_SECOND,
    TRAIN_EPOCH_SECONDS,
)


def time_metric(stage: str) -> str:
    return f"{TIME_PREFIX}{stage}_s"


def skew_metric(split: str, statistic: str) -> str:
    return f"{SKEW_PREFIX}{split}_{statistic}"


def data_metric(counter: str) -> str:
    return f"{DATA_PREFIX}{counter}"


def mllib_metric(metric: str) -> str:
    """``val/accuracy`` → ``mllib/val_accuracy`` (one section, flat names inside it)."""
    return MLLIB_PREFIX + metric.replace("/", "_")


def user_metric(function: str) -> str:
    """A ``train.metrics`` function ``pkg.mod:top_is_positive`` → ``val/top_is_positive``."""
    return VAL_PREFIX + function.rsplit(":", 1)[-1]


# -- names of runs logged before 0.2 ---------------------------------------------------------------
_RENAMED = {
    TRAIN_LOSS_STEP: "train_loss_step",
    TRAIN_THROUGHPUT: "throughput_samples_per_second",
    TRAIN_SAMPLES_PER_SECOND: "samples_per_second",
    TRAIN_EPOCH_SECONDS: "epoch_seconds",
    TRAIN_CENTROID_SHIFT: "centroid_shift",
    TRAIN_EMPTY_CLUSTERS: "empty_clusters",
    TRAIN_ITERATIONS: "iterations",
    COMPRESS_MODEL_SIZE: "model_size_bytes",
    COMPRESS_MODEL_LATENCY: "model_latency_ms_per_batch",
    COMPRESS_SIZE: "compressed_size_bytes",
    COMPRESS_LATENCY: "compressed_latency_ms_per_batch",
    COMPRESS_VAL_ACCURACY: "compressed_val_accuracy",
    COMPRESS_ACCURACY_COST: "compression_accuracy_cost",
}
_OLD_TO_NEW = {old: new for new, old in _RENAMED.items()}
_PREFIXES = ("train", "val", "time", "skew", "data", "mllib")


def legacy(name: str) -> str:
    """The flat name a metric had in runs logged before 0.2: ``val/accuracy`` → ``val_accuracy``."""
    if name in _RENAMED:
        return _RENAMED[name]
    prefix, sep, rest = name.partition("/")
    return f"{prefix}_{rest}" if sep and prefix in _PREFIXES else name


def current(name: str) -> str:
    """The name a metric has now, given its new or its old flat name."""
    if name in _OLD_TO_NEW:
        return _OLD_TO_NEW[name]
    if "/" in name:
        return name
    prefix, sep, rest = name.partition("_")
    return f"{prefix}/{rest}" if sep and prefix in _PREFIXES else name


def read_metric(metrics: dict[str, float], name: str) -> float | None:
    """``name`` from a run's metrics under its current name, else under its old one."""
    name = current(name)
    for key in (name, legacy(name)):
        if key in metrics:
            return float(metrics[key])
    return None
