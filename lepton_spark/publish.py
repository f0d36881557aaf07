"""After training: what goes into the MLflow run besides the metrics.

The trained network and the raw input example its served model is logged with, the pictures
(learning curves, confusion matrix, residuals), the compressed variant and the Spark MLlib
baseline. :func:`lepton_spark.pipeline.run_pipeline` calls these in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from pyspark.sql import SparkSession

from lepton_spark import plots, serving
from lepton_spark.compress import compress, measure
from lepton_spark.config import PipelineConfig
from lepton_spark.etl import prepare
from lepton_spark.manifest import Manifest
from lepton_spark.models import build_model
from lepton_spark.registry import register_variant
from lepton_spark.shards import ShardSet
from lepton_spark.spec import FeatureSpec
from lepton_spark.storage import locate
from lepton_spark.tracking import TrackedRun
from lepton_spark.train import TrainResult

log = logging.getLogger(__name__)


def raw_example(spark: SparkSession, cfg: PipelineConfig, rows: int = 5) -> pd.DataFrame:
    """A few rows of the transform's output, the model's input columns as the user has them."""
    from pyspark.sql import functions as F

    from lepton_spark.etl import is_vector, load_and_transform

    f = cfg.features
    columns = [*f.numeric, *f.categorical, *(a.name for a in f.arrays), *(t.name for t in f.text)]
    df = load_and_transform(spark, cfg).select(*columns).limit(rows)
    for a in f.arrays:  # Spark ML vectors as plain lists, as a pandas user would pass them
        if is_vector(df.schema[a.name].dataType):
            from pyspark.ml.functions import vector_to_array

            df = df.withColumn(a.name, vector_to_array(F.col(a.name)))
    return df.toPandas()


def trained_network(cfg: PipelineConfig, spec: FeatureSpec, result: TrainResult) -> torch.nn.Module:
    """The network with rank 0's trained weights, for serving (eval mode, on the CPU)."""
    model = build_model(cfg.model, spec)
    model.load_state_dict(result.load_state_dict())
    return model.eval()


def pip_requirements() -> list[str]:
    import importlib.metadata as md

    # lepton-spark itself travels inside the model (code_paths); these load it.
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pyarrow=={md.version('pyarrow')}",
        f"pydantic=={md.version('pydantic')}",
        f"mlflow=={md.version('mlflow')}",
    ]


def validation_batches(shard_set: ShardSet) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
    """The validation split as ``(model inputs, labels)`` batches (on the driver)."""
    from lepton_spark.loader import Layout, record_batches

    layout = Layout.of(shard_set.manifest.feature_spec)
    for shard in shard_set.manifest.split("validation").shards:
        for batch in record_batches(locate(shard_set.folder).child(shard.path), layout):
            yield layout.inputs(batch), batch.label.numpy()


def log_compressed(
    run: TrackedRun,
    cfg: PipelineConfig,
    shard_set: ShardSet,
    network: torch.nn.Module,
    example: pd.DataFrame,
    trained_version: str | None,
) -> None:
    """Compress the trained network (``cfg.compress``), measure both, log the compressed one as
    the run's ``model_compressed`` and, with a registered model, as a version of its own."""
    compressed = compress(network, cfg.compress)
    report = measure(network, compressed, validation_batches(shard_set), cfg.compress)
    log.info("compression %s", report.summary())
    run.log_json(report.as_dict(), "compression/report.json")
    run.log_text(report.summary() + "\n", "compression/report.txt")
    run.log_metrics(
        {
            "model_size_bytes": report.before.size_bytes,
            "model_latency_ms_per_batch": report.before.latency_ms,
            "compressed_size_bytes": report.after.size_bytes,
            "compressed_latency_ms_per_batch": report.after.latency_ms,
            "compressed_val_accuracy": report.after.accuracy,
            "compression_accuracy_cost": report.accuracy_cost,
        },
        step=0,
    )
    uri = serving.log_model(
        compressed,
        shard_set.manifest.feature_spec,
        example,
        pip_requirements=pip_requirements(),
        name="model_compressed",
    )
    tags = {"compression": report.method, "compressed_model_uri": uri}
    if cfg.tracking.registered_model:
        version = register_variant(
            uri,
            cfg.tracking.registered_model,
            report.method,
            {"val_accuracy": report.after.accuracy},
            trained_version,
        )
        tags["registry.compressed_version"] = version
    run.set_tags(tags)


def log_pictures(
    run: TrackedRun, result: TrainResult, network: torch.nn.Module, shard_set: ShardSet
) -> None:
    """Learning curves (with the per-step loss read back from MLflow), and the confusion matrix
    (classification) or the residual plot (regression, from the validation split on the driver)."""
    run.flush()
    step_loss = sorted(
        (m.step, m.value) for m in run.client.get_metric_history(run.run_id, "train_loss_step")
    )
    run.log_image(
        plots.learning_curves(result.history, step_loss, result.steps_per_epoch),
        "plots/learning_curves.png",
    )
    if result.confusion is not None:
        run.log_json(result.confusion, "confusion_matrix.json")
        run.log_image(plots.confusion_matrix(result.confusion), "plots/confusion_matrix.png")
    if shard_set.manifest.feature_spec.task == "regression":
        predicted, actual = [], []
        with torch.inference_mode():
            for inputs, labels in validation_batches(shard_set):
                predicted.append(network(inputs)[:, 0].float().numpy())
                actual.append(labels)
        if predicted:
            run.log_image(
                plots.residuals(np.concatenate(predicted), np.concatenate(actual)),
                "plots/residuals.png",
            )


def mllib_baseline(
    spark: SparkSession, cfg: PipelineConfig, manifest: Manifest, run: TrackedRun
) -> dict[str, float]:
    """Spark MLlib on the same split (ETL again: the split is seeded), logged as ``mllib_*``:
    logistic regression, linear regression or k-means by the task."""
    from lepton_spark import baselines

    prepared = prepare(spark, cfg)
    try:
        spec = prepared.feature_spec
        if prepared.rows != sum(s.rows for s in manifest.splits.values()):
            log.warning("the baseline's rows differ from the shards' (the source changed?)")
        supervised = {
            "numeric": spec.numeric,
            "categorical": {c.name: c.cardinality for c in spec.categorical},
            "label": spec.label,
            "max_iter": cfg.baseline.max_iter,
        }
        if spec.task == "classification":
            assert spec.num_classes is not None
            result = baselines.logistic_regression(
                prepared.train, prepared.validation, num_classes=spec.num_classes, **supervised
            )
        elif spec.task == "regression":
            result = baselines.linear_regression(prepared.train, prepared.validation, **supervised)
        else:
            result = baselines.kmeans(
                prepared.train,
                features=spec.numeric,
                k=int(cfg.model.options.get("k", 8)),
                seed=cfg.train.seed,
                max_iter=cfg.baseline.max_iter,
            )
    finally:
        prepared.release()
    metrics = {f"mllib_{k}": float(v) for k, v in result.metrics.items()}
    metrics["mllib_train_seconds"] = result.train_seconds
    run.log_metrics(metrics, step=0)
    run.set_tags({"baseline": result.name})
    log.info(
        "Spark MLlib %s: %s (fit %.1f s)",
        result.name,
        ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()),
        result.train_seconds,
    )
    return metrics
