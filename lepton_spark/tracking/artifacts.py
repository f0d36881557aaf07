"""What goes into a run besides the live metrics: the shards' reports, pictures, the compression
report, the MLlib baseline's metrics, the last checkpoint. Each a function of the run and plain
values; nothing here trains, scores or reads Spark.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from lepton_spark.names import (
    COMPRESS_ACCURACY_COST,
    COMPRESS_LATENCY,
    COMPRESS_MODEL_LATENCY,
    COMPRESS_MODEL_SIZE,
    COMPRESS_SIZE,
    COMPRESS_VAL_ACCURACY,
    DATASET_CONTEXT,
    TAG_BASELINE,
    TAG_DATASET_FINGERPRINT,
    TAG_NUM_WORKERS,
    TAG_ROWS_PREFIX,
    TAG_SHARDS,
    TAG_SHARDS_REUSED,
    TAG_SHARDS_STRATEGY,
    TRAIN_LOSS_STEP,
    data_metric,
    mllib_metric,
    skew_metric,
    time_metric,
)
from lepton_spark.redact import redact_tree
from lepton_spark.shards.manifest import Manifest, SkewReport
from lepton_spark.shards.storage import Location
from lepton_spark.spec import FeatureSpec
from lepton_spark.tracking import plots
from lepton_spark.tracking.run import TrackedRun

CONFIG_ARTIFACT = "config.yaml"
MANIFEST_ARTIFACT = "manifest.json"
SKEW_ARTIFACT = "skew_report.json"
HISTORY_ARTIFACT = "history.json"
CONFUSION_ARTIFACT = "confusion_matrix.json"
CHECKPOINT_ARTIFACT = "checkpoint"
LEARNING_CURVES = "plots/learning_curves.png"
CONFUSION_PLOT = "plots/confusion_matrix.png"
RESIDUALS_PLOT = "plots/residuals.png"
COMPRESSION_REPORT = "compression/report"


def log_shards(
    run: TrackedRun,
    manifest: Manifest,
    folder: str,
    reused: bool,
    skew: dict[str, SkewReport],
    num_workers: int,
) -> None:
    """The manifest (redacted), the skew report and metrics, the data-quality counts, and the
    tags that say which shards the run trained on."""
    run.log_json(redact_tree(manifest.model_dump(mode="json", by_alias=True)), MANIFEST_ARTIFACT)
    run.log_json({n: r.model_dump() for n, r in skew.items()}, SKEW_ARTIFACT)
    run.log_metrics(
        {
            skew_metric(n, k): getattr(r, k)
            for n, r in skew.items()
            for k in ("shard_max_over_mean", "rank_max_over_mean")
        },
        step=0,
    )
    quality = manifest.source.get("quality") or {}
    if isinstance(quality, dict) and quality:
        run.log_metrics({data_metric(k): float(v) for k, v in quality.items()}, step=0)
    run.set_tags(
        {
            **{TAG_ROWS_PREFIX + n: s.rows for n, s in manifest.splits.items()},
            TAG_NUM_WORKERS: num_workers,
            TAG_SHARDS: folder,
            TAG_SHARDS_REUSED: str(reused).lower(),
            TAG_SHARDS_STRATEGY: manifest.strategy,
            TAG_DATASET_FINGERPRINT: manifest.fingerprint,
        }
    )


def log_pictures(
    run: TrackedRun,
    history: list[dict[str, float]],
    steps_per_epoch: int,
    confusion: list[list[int]] | None,
    residuals: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Learning curves (with the per-step loss read back from MLflow), and the confusion matrix
    (classification) or the residual plot (regression: ``(predicted, actual)``)."""
    run.flush()
    step_loss = sorted(
        (m.step, m.value) for m in run.client.get_metric_history(run.run_id, TRAIN_LOSS_STEP)
    )
    run.log_image(plots.learning_curves(history, step_loss, steps_per_epoch), LEARNING_CURVES)
    if confusion is not None:
        run.log_json(confusion, CONFUSION_ARTIFACT)
        run.log_image(plots.confusion_matrix(confusion), CONFUSION_PLOT)
    if residuals is not None and len(residuals[0]):
        run.log_image(plots.residuals(*residuals), RESIDUALS_PLOT)


def log_compression(run: TrackedRun, report: Any) -> None:
    """A :class:`~lepton_spark.serving.compression.CompressionReport` as files and metrics."""
    run.log_json(report.as_dict(), f"{COMPRESSION_REPORT}.json")
    run.log_text(report.summary() + "\n", f"{COMPRESSION_REPORT}.txt")
    run.log_metrics(
        {
            COMPRESS_MODEL_SIZE: report.before.size_bytes,
            COMPRESS_MODEL_LATENCY: report.before.latency_ms,
            COMPRESS_SIZE: report.after.size_bytes,
            COMPRESS_LATENCY: report.after.latency_ms,
            COMPRESS_VAL_ACCURACY: report.after.accuracy,
            COMPRESS_ACCURACY_COST: report.accuracy_cost,
        },
        step=0,
    )


def log_baseline(run: TrackedRun, name: str, metrics: dict[str, float], seconds: float) -> dict:
    """An MLlib baseline's validation metrics as ``mllib/*``; the logged metrics."""
    logged = {mllib_metric(k): float(v) for k, v in metrics.items()}
    logged[mllib_metric("train_seconds")] = seconds
    run.log_metrics(logged, step=0)
    run.set_tags({TAG_BASELINE: name})
    return logged


def log_timings(run: TrackedRun, timings: dict[str, float]) -> None:
    run.log_metrics({time_metric(k): v for k, v in timings.items()}, step=0)


def keep_checkpoint(run: TrackedRun, source: Location, folders: Sequence[Location] = ()) -> None:
    """Log the checkpoint file ``source`` as the run's ``checkpoint/`` artifact, with the
    ``folders`` it names (FSDP's sharded state: ``checkpoint/<folder>/``), wherever they are (a
    remote one is copied through a local file first)."""
    if not source.is_file():
        return
    with tempfile.TemporaryDirectory(prefix="lepton-checkpoint-") as tmp:
        local = Path(source.path) if source.is_local else Path(tmp) / Path(source.path).name
        if not source.is_local:
            local.write_bytes(source.read_bytes())
        run.log_file(local, CHECKPOINT_ARTIFACT)
        for folder in folders:
            name = folder.path.rstrip("/").rsplit("/", 1)[-1]
            infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
            for info in infos:
                if info.type != pafs.FileType.File:
                    continue
                part = Location(folder.fs, info.path)
                file = Path(info.path) if folder.is_local else Path(tmp) / info.base_name
                if not folder.is_local:
                    file.write_bytes(part.read_bytes())
                run.log_file(file, f"{CHECKPOINT_ARTIFACT}/{name}")


def log_dataset(
    run: TrackedRun,
    name: str,
    source: dict[str, str],
    fingerprint: str,
    spec: FeatureSpec,
) -> None:
    """The training data as the run's MLflow dataset input: where it came from (``source``:
    one of ``path``, ``table_name``, ``sql``), its digest (the dataset fingerprint, as the shard
    folder's name has it) and the schema of the columns the model reads."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.spark_dataset_source import SparkDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    columns = [ColSpec(DataType.double, c) for c in spec.numeric]
    columns += [ColSpec(DataType.string, c) for c in spec.categorical_names]
    columns += [ColSpec(Array(DataType.double), a.name) for a in spec.arrays]
    columns += [ColSpec(DataType.string, t.name) for t in spec.texts]
    if spec.label is not None:
        label = DataType.double if spec.task == "regression" else DataType.long
        columns.append(ColSpec(label, spec.label))
    dataset = MetaDataset(
        SparkDatasetSource(**source), name=name, digest=fingerprint[:32], schema=Schema(columns)
    )
    context = InputTag(key="mlflow.data.context", value=DATASET_CONTEXT)
    run.client.log_inputs(
        run.run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[context])]
    )
