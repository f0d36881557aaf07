"""A model's whole life against an ``mlflow server`` on loopback: run (tracked live, plots,
registered, compressed) → promote → score on Spark, checked through ``MlflowClient``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from pyspark.sql import functions as F

from lepton_spark import run_pipeline
from lepton_spark.data.features import build_features
from lepton_spark.data.sources import load_and_transform
from lepton_spark.errors import ScoringError
from lepton_spark.serving.batch import score
from lepton_spark.serving.scorer import load_scorer
from lepton_spark.tracking.registry import promote
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

NAME = "lifecycle-demo"


def png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_run_promote_score_against_a_loopback_mlflow_server(
    spark, demo_config, tmp_path, mlflow_server, cli, horovod
):
    cfg = demo_config.with_overrides(
        {
            "tracking.registered_model": NAME,
            "tracking.system_metrics_interval_s": 1.0,
            "train.progress_every_steps": 10,
            "compress.quantize": True,
        }
    )
    result = run_pipeline(cfg, spark=spark, tracking_uri=mlflow_server, progress=lambda e: None)
    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    run = client.get_run(result.run_id)

    # Tags: what made the run.
    tags = run.data.tags
    assert tags["pipeline.hash"] == cfg.fingerprint()
    assert len(tags["dataset.fingerprint"]) == 64
    assert tags["num_workers"] == "2" and tags["ranks.device"] == "cpu"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert {"versions.torch", "versions.pyspark", "versions.mlflow"} <= set(tags)
    assert tags["lepton_spark.version"]

    # Metrics as training went: per-step loss and throughput at increasing global steps, epoch
    # metrics at epochs 1 and 2, stage times, skew, MLflow's system metrics.
    steps = client.get_metric_history(result.run_id, "train/loss_step")
    steps_per_epoch = result.rows["train"] // (2 * 256)
    assert [m.step for m in steps] == sorted(m.step for m in steps)
    assert len(steps) >= 2 * (steps_per_epoch // 10)
    assert steps[-1].step == 2 * steps_per_epoch
    assert all(m.value > 0 for m in steps)
    throughput = client.get_metric_history(result.run_id, "train/throughput_samples_per_second")
    assert len(throughput) == len(steps) and min(m.value for m in throughput) > 0
    assert [m.step for m in client.get_metric_history(result.run_id, "val/accuracy")] == [1, 2]
    metrics = run.data.metrics
    assert {"time/etl_s", "time/training_s", "skew/train_rank_max_over_mean"} <= set(metrics)
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics

    # Pictures and files a person reads.
    for name in ("plots/learning_curves.png", "plots/confusion_matrix.png"):
        local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=name)
        assert png(Path(local).read_bytes()), name
    confusion = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/confusion_matrix.json")
    counts = np.asarray(confusion)
    assert counts.sum() == result.rows["validation"]
    assert np.trace(counts) / counts.sum() == pytest.approx(result.metrics["val/accuracy"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "manifest.json", "skew_report.json", "plots"} <= artifacts

    # The served model takes raw columns and gives what the training-time preprocessing gives.
    check_raw_input_equals_training_preprocessing(spark, cfg, result)

    # Registry: candidate is the trained model; the compressed one is a version of its own.
    assert result.registered_version == "1"
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "1"
    compressed = client.get_model_version(NAME, "2")
    assert compressed.tags["lepton.compression"] == "int8"
    assert compressed.tags["lepton.compressed_from"] == "1"
    report = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/compression/report.json")
    assert report["after"]["size_bytes"] < 0.5 * report["before"]["size_bytes"]
    assert report["before"]["accuracy"] == pytest.approx(result.metrics["val/accuracy"], abs=1e-9)
    assert report["after"]["accuracy"] > 0.75  # the floor stated in the README
    assert abs(report["accuracy_cost"]) < 0.02
    assert float(compressed.tags["metrics.val/accuracy"]) == report["after"]["accuracy"]

    # Promote (the CLI, with the rule from the pipeline file): no champion yet → version 1.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps(cfg.model_dump(mode="json")))
    proc = cli("promote", str(pipeline), "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{NAME}: promoted: no champion yet; version 1" in proc.stderr
    # The compressed version is judged by its own accuracy, not its run's.
    decision = promote(client, NAME, version="2")
    expected = report["after"]["accuracy"] > result.metrics["val/accuracy"]
    assert decision.promoted == expected, decision.reason
    assert f"{report['after']['accuracy']:.4f}" in decision.reason
    # Only accuracy was measured for it: another metric is not borrowed from the trained model.
    with pytest.raises(ValueError, match="was not measured for it"):
        promote(client, NAME, metric="val/loss", mode="min", version="2")
    # Score with the trained version: dynamic int8 quantizes activations with each batch's own
    # range, so the compressed model's outputs depend on which rows share a batch, and the
    # single-process comparison below would not be exact.
    client.set_registered_model_alias(NAME, "champion", "1")

    check_scoring(spark, cfg, tmp_path, mlflow_server)


def check_raw_input_equals_training_preprocessing(spark, cfg, result) -> None:
    """Rows of the transform's output: the pyfunc model on the raw columns against the network
    on the same rows as Spark's ETL prepares them for training."""
    raw = load_and_transform(spark, cfg).withColumn("rid", F.monotonically_increasing_id())
    features, spec, _ = build_features(raw, cfg.features, keep=("rid",))
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    trained_spec = json.loads((local / "artifacts" / "feature_spec.json").read_text())
    assert spec.model_dump(mode="json") == trained_spec  # the same vocabularies and statistics
    prepared = features.orderBy("rid").limit(2000).toPandas()
    raw_rows = raw.join(prepared[["rid"]].pipe(spark.createDataFrame), "rid").orderBy("rid")
    raw_rows = raw_rows.toPandas()
    assert raw_rows["rid"].tolist() == prepared["rid"].tolist()

    model = mlflow.pyfunc.load_model(result.model_uri)
    served = np.stack(model.predict(raw_rows[spec.input_columns])["probabilities"])
    # Missing values pass MLflow's schema check: a missing number is an invalid row (trained with
    # nulls: fail, the model predicts nothing for it), a missing category the unknown index.
    gaps = raw_rows[spec.input_columns].head(3).copy()
    gaps.loc[0, "x0"], gaps.loc[1, "cat_a"] = np.nan, None
    out = model.predict(gaps)
    assert out["prediction"].isna().tolist() == [True, False, False]
    assert out["probabilities"].isna().tolist() == [True, False, False]
    np.testing.assert_allclose(np.stack(out["probabilities"][1:]).sum(axis=1), 1.0, rtol=1e-5)
    network = load_scorer(local).network  # the safetensors weights, loaded without MLflow
    with torch.no_grad():
        logits = network(
            {
                "numeric": torch.tensor(prepared[spec.numeric].to_numpy(np.float32)),
                "categorical": torch.tensor(prepared[spec.categorical_names].to_numpy(np.int64)),
            }
        )
    np.testing.assert_allclose(served, torch.softmax(logits, 1).numpy(), rtol=1e-4, atol=1e-6)


def score_cli(table, out, server: str, *more: str):
    """``lepton-spark score`` with the champion, as the README shows it."""
    return run_cli(
        "score",
        "--model",
        f"models:/{NAME}@champion",
        "--input",
        str(table),
        "--output",
        str(out),
        "--tracking-uri",
        server,
        *more,
        cwd=out.parent,
    )


def check_scoring(spark, cfg, tmp_path, server: str) -> None:
    table = tmp_path / "tomorrow.parquet"
    source = load_and_transform(spark, cfg.with_overrides({"sources.events.generate.seed": 99}))
    source.drop("label").withColumn("id", F.monotonically_increasing_id()).repartition(
        3
    ).write.parquet(str(table))
    rows = spark.read.parquet(str(table)).count()

    out = tmp_path / "scored"
    proc = score_cli(table, out, server, "--key", "id", "--master", "local[2]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"scored {rows:,} rows" in proc.stderr.replace("\n", " ")
    scored = pd.read_parquet(out).sort_values("id").reset_index(drop=True)
    assert list(scored.columns) == ["id", "prediction", "probabilities"]
    assert len(scored) == rows and scored["id"].is_unique

    # The same rows through the pyfunc model in this one process.
    frame = pd.read_parquet(table).sort_values("id").reset_index(drop=True)
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(frame)
    assert (scored["prediction"].to_numpy() == expected["prediction"].to_numpy()).all()
    np.testing.assert_allclose(
        np.stack(scored["probabilities"]), np.stack(expected["probabilities"]), rtol=1e-5
    )

    # Loaded once per Python worker, not per batch.
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1000")
    try:
        result = score(
            spark, f"models:/{NAME}@champion", str(table), str(tmp_path / "again"), keys=["id"]
        )
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)
    assert result.rows == rows and result.batches >= rows // 1000
    assert 1 <= result.model_loads <= 2 < result.batches

    # Bad input: named, nothing written, exit code 2 from the CLI.
    no_x0 = tmp_path / "no_x0.parquet"
    spark.read.parquet(str(table)).drop("x0").write.parquet(str(no_x0))
    with pytest.raises(ScoringError, match=r"lacks the model's columns \['x0'\]"):
        score(spark, f"models:/{NAME}@champion", str(no_x0), str(tmp_path / "x"), keys=["id"])
    assert not (tmp_path / "x").exists()
    proc = score_cli(table, out, server)
    assert proc.returncode == 2
    assert "exists; --overwrite replaces it" in proc.stderr
