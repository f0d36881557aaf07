"""Batch scoring: ``lepton-spark score`` against ``mlflow.pyfunc.spark_udf``, same model and table.

The demo's model shape (MLP with embeddings, logged by :func:`lepton_spark.serving.log_model`
into a scratch MLflow store), a Parquet table of the demo's raw columns plus an ``id``, on
local[2]. Each round scores the whole table both ways and writes Parquet (``id``, prediction,
probabilities): (a) ``lepton_spark.serving.batch.score`` (model loaded once per Python worker,
``mapInArrow``, no pandas), (b) ``spark_udf`` with ``env_manager="local"`` over the same columns,
``result_type`` ``prediction long, probabilities array<float>``. Rounds alternate a and b after a
warm-up round of each; medians of rows/s are compared. The two outputs are checked to be equal.

    python -m benchmarks.scoring [--rows 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from benchmarks._common import DEMO_MODEL, WORK, median, report
from lepton_spark.config import load_config
from lepton_spark.data.features import build_features
from lepton_spark.data.session import spark_session
from lepton_spark.data.sources import load_and_transform
from lepton_spark.models import build_model
from lepton_spark.serving.batch import score
from lepton_spark.serving.pyfunc import log_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {"sources.events.generate.rows": args.rows, "spark.master": "local[2]"},
    )
    spark = spark_session(cfg.spark, app_name="benchmark scoring")
    work = WORK / "bench-scoring"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = load_and_transform(spark, cfg)
    _, spec, _ = build_features(raw, cfg.features)  # the vocabularies and statistics
    table = work / "input.parquet"
    from pyspark.sql import functions as F

    raw.drop("label").withColumn("id", F.monotonically_increasing_id()).write.parquet(str(table))

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    with tempfile.TemporaryDirectory() as tmp:
        exp = mlflow.create_experiment("bench-scoring", artifact_location=Path(tmp).as_uri())
        with mlflow.start_run(experiment_id=exp):
            example = spark.read.parquet(str(table)).limit(5).toPandas()
            model_uri = log_model(
                build_model(DEMO_MODEL, spec, seed=0).eval(),
                spec,
                example[spec.input_columns],
                pip_requirements=[],
            )
        df = spark.read.parquet(str(table))
        rows = df.count()
        udf = mlflow.pyfunc.spark_udf(
            spark,
            model_uri,
            result_type="prediction long, probabilities array<float>",
            env_manager="local",
        )
        ours, theirs = [], []
        for i in range(args.rounds + 1):  # round 0 starts Python workers and JIT paths: not kept
            started = time.perf_counter()
            result = score(spark, model_uri, str(table), str(work / f"ours-{i}"), keys=["id"])
            ours.append(rows / (time.perf_counter() - started))
            assert result.rows == rows
            started = time.perf_counter()
            scored = df.select(
                "id", udf(F.struct(*[F.col(c) for c in spec.input_columns])).alias("p")
            )
            scored.select("id", "p.prediction", "p.probabilities").write.parquet(
                str(work / f"udf-{i}")
            )
            theirs.append(rows / (time.perf_counter() - started))
            label = f"round {i}" + (" (warm-up)" if i == 0 else "")
            print(f"{label}: score {ours[-1]:,.0f} rows/s, spark_udf {theirs[-1]:,.0f} rows/s")
        a = spark.read.parquet(str(work / "ours-0")).orderBy("id").toPandas()
        b = spark.read.parquet(str(work / "udf-0")).orderBy("id").toPandas()
        assert (a["prediction"].to_numpy() == b["prediction"].to_numpy()).all()
        np.testing.assert_allclose(
            np.stack(a["probabilities"]), np.stack(b["probabilities"]), rtol=1e-5, atol=1e-6
        )
    ours, theirs = ours[1:], theirs[1:]
    report(
        "scoring",
        {"score_vs_spark_udf": median(ours) / median(theirs)},
        {
            "rows": rows,
            "rounds": args.rounds,
            "score_rows_per_second": ours,
            "spark_udf_rows_per_second": theirs,
            "master": "local[2]",
            "goal": "score_vs_spark_udf >= 1.5",
            "outputs_equal": True,
        },
    )
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
