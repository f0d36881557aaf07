"""The main job end to end: real Spark, real Horovod ranks, real MLflow (local store and server)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from lepton_spark import events, run_pipeline
from lepton_spark.config import PipelineConfig
from lepton_spark.errors import ShardError
from lepton_spark.pipeline.steps import materialize_shards
from lepton_spark.serving.preprocess import shard_rows
from lepton_spark.shards.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def check_tracked_run(client: MlflowClient, result, epochs: int) -> None:
    mlflow.set_tracking_uri(result.tracking_uri)  # as a user does to read the run back
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(epochs)
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["sources.events.generate.rows"] == "30000"
    history = client.get_metric_history(result.run_id, "val/accuracy")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    assert {"train/loss", "val/loss", "time/training_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "manifest.json", "history.json"} <= artifacts
    logged = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/manifest.json")
    assert logged["splits"]["train"]["rows"] == result.rows["train"]
    [dataset] = run.inputs.dataset_inputs  # the training data as the run's dataset input
    assert dataset.dataset.digest == logged["fingerprint"][:32]
    assert dataset.dataset.name == result.experiment
    assert "FROM events" in dataset.dataset.source  # the SQL the shards were made by
    assert [t.value for t in dataset.tags] == ["training"]


def check_model_predicts(result) -> None:
    """The logged model loads with pyfunc, takes raw columns (category strings, unstandardised
    numbers) and reproduces the validation accuracy of training."""
    mlflow.set_tracking_uri(result.tracking_uri)
    parts = list(shard_rows(result.shard_folder, "validation"))
    frame = pd.concat([raw for raw, _ in parts], ignore_index=True)
    labels = np.concatenate([label for _, label in parts])
    assert frame["cat_a"].map(type).eq(str).any()  # raw values, not vocabulary indices
    model = mlflow.pyfunc.load_model(result.model_uri)
    predicted = model.predict(frame)
    probabilities = np.stack(predicted["probabilities"])
    assert probabilities.shape == (len(frame), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (predicted["prediction"].to_numpy() == probabilities.argmax(axis=1)).all()
    accuracy = float((predicted["prediction"].to_numpy() == labels).mean())
    # Raw numbers go through standardisation again: a row on the boundary may flip (float32).
    assert accuracy == pytest.approx(result.metrics["val/accuracy"], abs=2 / len(frame))


@pytest.mark.connect
@pytest.mark.slow
def test_demo_pipeline_trains_and_tracks_on_the_local_store(spark, demo_config, horovod):
    seen: list[events.Event] = []
    result = run_pipeline(demo_config, spark=spark, progress=seen.append)

    # Known Bayes accuracy 0.92 and a near-balanced label: chance is about 0.5.
    assert result.metrics["val/accuracy"] > 0.80, result.history
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    assert sum(result.rows.values()) == 30_000
    assert set(result.timings) >= {"etl", "shards", "training"}
    assert [e.epoch for e in seen if isinstance(e, events.Epoch)] == [1, 2]
    assert any(isinstance(e, events.Progress) for e in seen)

    assert result.tracking_uri.startswith("sqlite:///")
    assert Path(result.tracking_uri.removeprefix("sqlite:///")).is_file()
    check_tracked_run(MlflowClient(result.tracking_uri), result, epochs=2)
    check_model_predicts(result)


@pytest.mark.slow
def test_the_same_pipeline_tracks_to_an_mlflow_server_on_loopback(
    spark, demo_config, tmp_path, mlflow_server, horovod
):
    result = run_pipeline(demo_config, spark=spark, tracking_uri=mlflow_server, progress=print)
    assert result.tracking_uri == mlflow_server
    assert not (tmp_path / "mlruns-data").exists()  # nothing went to the local store
    # The server is this run's target only: the next run in this process resolves its own.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert not mlflow.is_tracking_uri_set()
    check_tracked_run(MlflowClient(mlflow_server), result, epochs=2)
    check_model_predicts(result)


@pytest.mark.slow
def test_cli_runs_the_demo_and_prints_where_the_results_are(tmp_path, cli, horovod):
    proc = cli(
        "run",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--master",
        "local[2]",
        "--set",
        "sources.events.generate.rows=20000",
        "--set",
        "train.epochs=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/accuracy" in proc.stdout
    assert (
        f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlruns-data/mlflow.db" in proc.stdout
    )
    assert (tmp_path / "mlruns-data" / "mlflow.db").is_file()
    assert list((tmp_path / ".lepton" / "shards").glob("tabular-demo-*/manifest.json"))
    assert "epoch 1/1" in proc.stderr


def test_cli_bad_config_fails_with_the_field_named_and_exit_code_2(tmp_path, cli):
    proc = cli(
        "run",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--set",
        "train.epochs=0",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr
    assert not (tmp_path / "mlruns-data").exists()


def test_cli_set_takes_several_overrides_at_once(tmp_path, cli):
    # --set train.lr=0.01 train.epochs=0: the second one is read too (and refused).
    proc = cli(
        "run",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--set",
        "train.lr=0.01",
        "train.epochs=0",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr
    proc = cli("run", str(ROOT / "pipelines" / "tabular_demo.yaml"), "oops", cwd=tmp_path)
    assert proc.returncode == 2 and "must look like section.key=value" in proc.stderr


def test_cli_missing_source_path_is_named(tmp_path, cli):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        "name: missing\n"
        "sources:\n  facts:\n    format: parquet\n    path: /nowhere/facts.parquet\n"
        "features:\n  numeric: [a]\n  label: y\n"
        f"tracking:\n  local_store: {tmp_path / 'store'}\n"
    )
    proc = cli(
        "run",
        str(pipeline),
        "--master",
        "local[1]",
        "--num-workers",
        "1",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "/nowhere/facts.parquet" in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("missing").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "does not exist" in runs[0].data.tags["error"]


def parquet_pipeline(tmp_path: Path, source: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "reuse",
            "sources": {"facts": {"format": "parquet", "path": str(source)}},
            "features": {"numeric": ["a"], "categorical": ["c"], "label": "y"},
            "shards": {"root": str(tmp_path / "shards"), "rows_per_shard": 200},
        }
    )


def attempt_of(shard_set) -> str:
    return shard_set.manifest.split("train").shards[0].path.split("/")[0]


def test_shards_are_reused_by_fingerprint_and_rebuilt_on_demand(spark, tmp_path, caplog):
    source = tmp_path / "facts"
    frame = spark.range(1_000).selectExpr(
        "id * 0.5 AS a", "CAST(id % 5 AS STRING) AS c", "id % 2 AS y"
    )
    frame.write.parquet(str(source))
    cfg = parquet_pipeline(tmp_path, source)

    first = materialize_shards(spark, cfg)
    assert not first.reused
    with caplog.at_level("INFO", logger="lepton_spark.pipeline"):
        again = materialize_shards(spark, cfg)
    assert again.reused and again.folder == first.folder
    assert again.manifest == first.manifest
    assert "reusing the shards" in caplog.text

    rebuilt = materialize_shards(spark, cfg, rebuild=True)
    assert not rebuilt.reused and rebuilt.folder == first.folder
    assert attempt_of(rebuilt) != attempt_of(first)
    assert [p.name for p in Path(first.folder).iterdir() if p.is_dir()] == [attempt_of(rebuilt)]

    # New input data (a file added): a new fingerprint, a new folder.
    frame.limit(10).write.mode("append").parquet(str(source))
    changed = materialize_shards(spark, cfg)
    assert not changed.reused and changed.folder != first.folder
    assert sum(s.rows for s in changed.manifest.splits.values()) == 1_010
    # A changed transform or feature spec gives a new folder too.
    other = materialize_shards(spark, cfg.with_overrides({"split.seed": 7}))
    assert other.folder not in (first.folder, changed.folder)
    # A committed folder whose files no longer match is reported, and rewritten on demand.
    shard = changed.manifest.split("train").shards[0]
    (Path(changed.folder) / shard.path).unlink()
    with pytest.raises(ShardError, match="--rebuild-shards"):
        materialize_shards(spark, cfg)
    assert not materialize_shards(spark, cfg, rebuild=True).reused
    assert materialize_shards(spark, cfg).reused


@pytest.mark.slow
def test_a_skewed_hash_split_trains_on_two_ranks_without_hanging(spark, demo_config, horovod):
    # 70% of the rows share one key: one shard outweighs all the others.
    cfg = demo_config.with_overrides(
        {
            "transform": "SELECT *, x1 * x2 AS x1_x2, "
            "IF(x0 > -0.52, 0, abs(hash(x1)) % 40 + 1) AS user_id FROM events",
            "shards.strategy": "hash",
            "shards.key": "user_id",
            "train.tail": "pad",
            "train.epochs": 1,
        }
    )
    result = run_pipeline(cfg, spark=spark, progress=lambda e: None)
    assert result.metrics["val/accuracy"] > 0.7
    skew = read_manifest(result.shard_folder).skew["train"]
    assert skew.rank_max_over_mean > 1.25
    assert any("rank rows are skewed" in w for w in result.warnings)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["skew/train_rank_max_over_mean"] == pytest.approx(
        skew.rank_max_over_mean
    )
    assert run.data.tags["shards.strategy"] == "hash"
