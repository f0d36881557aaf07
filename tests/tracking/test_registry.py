"""The registry: each trained model registered as 'candidate'; 'champion' moves only to a version
that beats it by the config's rule; and the tags that say what code and libraries made a run."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from lepton_spark import run_pipeline
from lepton_spark.tracking.registry import promote
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_candidates_are_registered_and_champion_moves_only_to_a_better_version(
    spark, demo_config, tmp_path, cli, horovod
):
    cfg = demo_config.with_overrides({"tracking.registered_model": "demo-classifier"})
    weak = run_pipeline(
        cfg.with_overrides({"train.epochs": 1, "train.lr": 1e-5}),
        spark=spark,
        progress=lambda e: None,
    )
    client = MlflowClient(weak.tracking_uri)
    assert weak.registered_version == "1"
    assert str(client.get_model_version_by_alias("demo-classifier", "candidate").version) == "1"

    first = promote(client, "demo-classifier")
    assert first.promoted and first.champion_before is None and "no champion yet" in first.reason

    strong = run_pipeline(cfg, spark=spark, progress=lambda e: None)
    assert strong.registered_version == "2"
    assert strong.metrics["val/accuracy"] > weak.metrics["val/accuracy"]
    second = promote(client, "demo-classifier")
    assert second.promoted and second.champion_before == "1"
    assert f"{strong.metrics['val/accuracy']:.4f} beats champion version 1's" in second.reason
    assert str(client.get_model_version_by_alias("demo-classifier", "champion").version) == "2"

    # A version tag claiming a better metric is not believed: the run's metric decides.
    client.set_model_version_tag("demo-classifier", "1", "metrics.val/accuracy", "0.9999")
    back = promote(client, "demo-classifier", version="1")  # the weaker one does not win
    assert not back.promoted and "does not beat" in back.reason
    assert f"{weak.metrics['val/accuracy']:.4f}" in back.reason
    assert str(client.get_model_version_by_alias("demo-classifier", "champion").version) == "2"

    # The same from the command line, with the rule from the pipeline file.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = cli("promote", str(pipeline), "--version", "1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo-classifier: not promoted: version 1 val/accuracy" in proc.stderr

    # What made the run: code, config and libraries.
    tags = client.get_run(strong.run_id).data.tags
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["pipeline.hash"] == cfg.fingerprint()
    assert tags["versions.torch"].startswith("2.") and "versions.pyspark" in tags
    assert tags["registry.model"] == "demo-classifier" and tags["registry.version"] == "2"
    assert tags["ranks.device"] == "cpu" and tags["num_workers"] == "2"
