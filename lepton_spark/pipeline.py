"""The main job: config → Spark ETL → Arrow shards → Horovod barrier training → MLflow.

``run_pipeline(config)`` is what ``lepton-spark run`` calls; notebooks and jobs call it (or its
steps) the same way.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from pyspark.sql import SparkSession

from lepton_spark import __version__
from lepton_spark.barrier import run_barrier
from lepton_spark.config import PipelineConfig, load_config
from lepton_spark.etl import prepare, spark_session
from lepton_spark.manifest import MANIFEST_NAME
from lepton_spark.models import ExportedClassifier, build_model
from lepton_spark.progress import ConsoleProgress
from lepton_spark.shards import ShardSet, write_shards
from lepton_spark.spec import FeatureSpec
from lepton_spark.tracking import TrackedRun, resolve_tracking
from lepton_spark.train import TrainResult, TrainSpec, train_rank

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_id: str
    experiment: str
    tracking_uri: str
    ui_command: str
    model_uri: str
    shard_folder: Path
    metrics: dict[str, float]
    history: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - started, 2)


def shard_fingerprint(cfg: PipelineConfig) -> str:
    """Same data, features, split and sharding → same shard folder name."""
    fp = cfg.fingerprint("sources", "transform", "features", "split", "shards")
    return f"{cfg.name}-{fp}-w{cfg.train.num_workers}"


def model_signature(spec: FeatureSpec) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = [ColSpec("float", c) for c in spec.numeric]
    inputs += [ColSpec("long", c) for c in spec.categorical_names]
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes), "probabilities")])
    return ModelSignature(inputs=Schema(inputs), outputs=outputs)


def export_model(cfg: PipelineConfig, spec: FeatureSpec, result: TrainResult) -> torch.nn.Module:
    """The trained weights in their served form (one input matrix, probabilities out)."""
    model = build_model(cfg.model, spec)
    model.load_state_dict(result.load_state_dict())
    cardinalities = [c.cardinality for c in spec.categorical]
    return ExportedClassifier(model, len(spec.numeric), cardinalities).eval()


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"lepton-spark=={md.version('lepton-spark')}",
    ]


def _events_to_mlflow(run: TrackedRun) -> Callable[[dict[str, Any]], None]:
    def handle(event: dict[str, Any]) -> None:
        if event.get("event") == "epoch":
            run.log_metrics(event["metrics"], step=int(event["epoch"]))

    return handle


def run_pipeline(
    config: PipelineConfig | str | Path,
    *,
    spark: SparkSession | None = None,
    tracking_uri: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> PipelineResult:
    """Run the whole pipeline and return where everything went.

    ``spark``: an existing session (a notebook's); otherwise one is made from ``config.spark``.
    ``progress``: receives rank events; by default they are shown on the console.
    """
    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    target = resolve_tracking(cfg.tracking, tracking_uri)
    timings: dict[str, float] = {}
    experiment = cfg.tracking.experiment or cfg.name
    console = ConsoleProgress() if progress is None else None
    show = progress or console
    assert show is not None
    tags = {"lepton_spark.version": __version__, "pipeline": cfg.name}

    with TrackedRun(target, experiment, cfg.tracking.run_name, tags) as run:
        run.log_params(cfg.flat())
        run.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        with _timed(timings, "etl"):
            spark = spark or spark_session(cfg.spark, app_name=f"lepton-spark {cfg.name}")
            prepared = prepare(spark, cfg)
        with _timed(timings, "shards"):
            shard_set = _write_shards(cfg, prepared)
        run.log_file(shard_set.folder / MANIFEST_NAME)
        rows = {name: s.rows for name, s in shard_set.manifest.splits.items()}
        run.set_tags(
            {
                "rows.train": rows["train"],
                "rows.validation": rows["validation"],
                "num_workers": cfg.train.num_workers,
                "shards": str(shard_set.folder),
            }
        )

        spec = TrainSpec(shard_folder=str(shard_set.folder), train=cfg.train, model=cfg.model)
        mlflow_events = _events_to_mlflow(run)

        def on_event(event: dict[str, Any]) -> None:
            mlflow_events(event)
            show(event)

        with _timed(timings, "training"):
            try:
                results = run_barrier(
                    spark,
                    functools.partial(train_rank, spec),
                    cfg.train.num_workers,
                    on_event=on_event,
                )
            finally:
                if console is not None:
                    console.close()
        chief = results[0]
        with _timed(timings, "model_logging"):
            feature_spec = shard_set.manifest.feature_spec
            example = prepared.validation.limit(5).toPandas()[feature_spec.input_columns]
            model_uri = run.log_pytorch_model(
                export_model(cfg, feature_spec, chief),
                signature=model_signature(feature_spec),
                input_example=example,
                pip_requirements=_pip_requirements(),
            )
        run.log_json(chief.history, "history.json")
        run.log_metrics({f"time_{k}_s": v for k, v in timings.items()}, step=0)
        final = {k: v for k, v in chief.history[-1].items() if k != "epoch"}
        return PipelineResult(
            run_id=run.run_id,
            experiment=experiment,
            tracking_uri=target.tracking_uri,
            ui_command=target.ui_command,
            model_uri=model_uri,
            shard_folder=shard_set.folder,
            metrics=final,
            history=chief.history,
            timings=timings,
            rows=rows,
        )


def _write_shards(cfg: PipelineConfig, prepared: Any) -> ShardSet:
    val_rows = round(prepared.rows * cfg.split.validation_fraction)
    return write_shards(
        {"train": prepared.train, "validation": prepared.validation},
        prepared.feature_spec,
        root=cfg.shards.root,
        fingerprint=shard_fingerprint(cfg),
        num_workers=cfg.train.num_workers,
        rows_per_shard=cfg.shards.rows_per_shard,
        estimated_rows={"train": prepared.rows - val_rows, "validation": val_rows},
    )
