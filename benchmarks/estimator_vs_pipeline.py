"""TorchEstimator.fit against run_pipeline: the same work through the two front doors.

The demo table (generated on Spark, the demo's SQL transform) trained by the demo's MLP on 2
ranks under local[2]: once as a pipeline file (``run_pipeline``), once as a DataFrame
(``TorchEstimator(...).fit(df)`` on the transform's output), alternating, every run writing its
shards afresh (``rebuild_shards``) so that both pay for ETL, shards, training and the MLflow run.
Printed: the median wall time of ``fit`` over ``run_pipeline`` (goal ≤ 1.05).

    python -m benchmarks.estimator_vs_pipeline [--rows 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import median, report
from lepton_spark import TorchEstimator, run_pipeline
from lepton_spark.config import load_config
from lepton_spark.data.session import spark_session
from lepton_spark.data.sources import load_and_transform

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lepton-estimator-bench-"))
    cfg = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {
            "sources.events.generate.rows": args.rows,
            "train.epochs": 2,
            "shards.root": str(work / "shards"),
            "train.checkpoint_root": str(work / "checkpoints"),
            "tracking.local_store": str(work / "mlruns-data"),
            "tracking.registered_model": None,
            "tracking.system_metrics_interval_s": None,
        },
    )
    spark = spark_session(cfg.spark.model_copy(update={"master": "local[2]"}), app_name="bench")
    frame = load_and_transform(spark, cfg)  # the same rows, as a user's DataFrame
    f, t = cfg.features, cfg.train
    estimator = TorchEstimator(
        numeric=f.numeric,
        categorical=f.categorical,
        labelCol=f.label,
        num_classes=f.num_classes,
        standardize=f.standardize,
        validation_fraction=cfg.split.validation_fraction,
        split_seed=cfg.split.seed,
        rows_per_shard=cfg.shards.rows_per_shard,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        lr_schedule=t.lr_schedule,
        hidden=cfg.model.hidden,
        embedding_dim=cfg.model.embedding_dim,
        shards_root=cfg.shards.root,
        checkpoint_root=t.checkpoint_root,
        local_store=cfg.tracking.local_store,
        system_metrics_interval_s=None,
        rebuild_shards=True,
        name=cfg.name,
    ).with_progress(lambda e: None)
    run_pipeline(cfg, spark=spark, progress=lambda e: None)  # JIT, Python workers warm
    arms: dict[str, list[float]] = {"pipeline": [], "estimator": []}
    accuracy: dict[str, list[float]] = {"pipeline": [], "estimator": []}
    for i in range(args.rounds):
        started = time.perf_counter()
        result = run_pipeline(cfg, spark=spark, progress=lambda e: None, rebuild_shards=True)
        arms["pipeline"].append(time.perf_counter() - started)
        accuracy["pipeline"].append(result.metrics["val/accuracy"])
        started = time.perf_counter()
        model = estimator.fit(frame)
        arms["estimator"].append(time.perf_counter() - started)
        accuracy["estimator"].append(model.metrics["val/accuracy"])
        print(
            f"round {i + 1}: pipeline {arms['pipeline'][-1]:.1f} s, "
            f"estimator {arms['estimator'][-1]:.1f} s"
        )
    report(
        "estimator_vs_pipeline",
        {"estimator_over_pipeline": median(arms["estimator"]) / median(arms["pipeline"])},
        {"rows": args.rows, "seconds": arms, "val_accuracy": accuracy},
    )


if __name__ == "__main__":
    main()
