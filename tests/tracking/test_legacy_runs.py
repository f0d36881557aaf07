"""Runs and versions logged before 0.2 (flat metric names) still decide ``promote``."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from lepton_spark.names import CANDIDATE, CHAMPION
from lepton_spark.tracking.registry import promote
from tests.helpers import ROOT

MODEL = ROOT / "tests" / "fixtures" / "legacy_model"


@pytest.fixture()
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def version_with(client: MlflowClient, tmp_path, name: str, metrics: dict[str, float]) -> str:
    """A registered version whose run logged ``metrics`` (under the names given)."""
    experiment = client.get_experiment_by_name("legacy") or None
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("legacy", artifact_location=(tmp_path / "art").as_uri())
    )
    run = client.create_run(experiment_id)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.log_artifacts(run.info.run_id, str(MODEL), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run.info.run_id
    ).version
    client.set_registered_model_alias(name, CANDIDATE, version)
    return str(version)


def test_promote_reads_runs_logged_with_the_old_metric_names(client, tmp_path):
    old = version_with(client, tmp_path, "m", {"val_accuracy": 0.80})
    first = promote(client, "m")  # the default metric is now val/accuracy
    assert first.promoted and first.version == old
    new = version_with(client, tmp_path, "m", {"val/accuracy": 0.85})
    second = promote(client, "m", metric="val_accuracy")  # an old config's name works too
    assert second.promoted and second.version == new
    assert "val/accuracy 0.8500 beats champion version 1's 0.8000" in second.reason
    assert str(client.get_model_version_by_alias("m", CHAMPION).version) == new


def test_a_missing_metric_is_named_with_what_the_run_has(client, tmp_path):
    version_with(client, tmp_path, "m", {"val_loss": 0.3})
    with pytest.raises(ValueError, match=r"has no metric 'val/accuracy'; it has \['val_loss'\]"):
        promote(client, "m")
