"""Run keys read runs logged before 0.2 (flat metric names) as they read today's."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Metric

from lepton_spark import run_pipeline
from lepton_spark.names import TAG_CONFIG_HASH, TAG_MODEL_URI, TAG_ROWS_PREFIX, TAG_RUN_KEY
from lepton_spark.tracking.target import resolve_tracking


def test_a_finished_run_with_old_metric_names_is_returned_as_it_is(demo_config):
    target = resolve_tracking(demo_config.tracking)
    client = MlflowClient(target.tracking_uri)
    experiment = client.create_experiment(demo_config.name)
    run = client.create_run(
        experiment,
        tags={
            TAG_RUN_KEY: "2026-11-01",
            TAG_CONFIG_HASH: demo_config.training_fingerprint(),
            TAG_MODEL_URI: "models:/m-1234",
            TAG_ROWS_PREFIX + "train": "900",
            TAG_ROWS_PREFIX + "validation": "100",
        },
    )
    old = {"val_accuracy": 0.91, "val_loss": 0.25, "train_loss": 0.3, "epoch_seconds": 2.0}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 1) for k, v in old.items()])
    client.set_terminated(run.info.run_id)

    result = run_pipeline(demo_config, run_key="2026-11-01")  # no Spark: nothing to train
    assert result.outcome == "already_finished" and result.run_id == run.info.run_id
    assert result.metrics == {
        "val/accuracy": 0.91,
        "val/loss": 0.25,
        "train/loss": 0.3,
        "train/epoch_seconds": 2.0,
    }
    assert result.rows == {"train": 900, "validation": 100}
    assert result.model_uri == "models:/m-1234" and result.warnings == []
