"""Faults during training: a rank killed mid-epoch, checkpoints that resume where training was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from lepton_spark import run_pipeline
from lepton_spark.checkpoint import Checkpoint, Position, load_checkpoint, save_checkpoint


def test_a_checkpoint_round_trips_through_a_safe_load(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    schedule.step()
    history = [{"epoch": 1, "val_accuracy": 0.5}]
    save_checkpoint(
        tmp_path / "ck",
        Checkpoint(
            Position(1, 7, 42),
            model.state_dict(),
            optimizer.state_dict(),
            schedule.state_dict(),
            history,
        ),
    )
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["checkpoint.pt"]  # no temp left
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded is not None and loaded.position == Position(1, 7, 42)
    assert loaded.history == history
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model[name], value)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded.optimizer)
    torch.testing.assert_close(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert load_checkpoint(tmp_path / "none") is None


@pytest.mark.slow
def test_a_killed_rank_is_retried_and_training_resumes_from_the_checkpoint(
    spark, demo_config, tmp_path
):
    base = {
        "train.epochs": 2,
        "train.checkpoint_every_steps": 20,
        "train.checkpoint_root": str(tmp_path / "checkpoints"),
    }
    clean = run_pipeline(demo_config.with_overrides(base), spark=spark, progress=lambda e: None)

    events: list[dict] = []
    faulty = demo_config.with_overrides({**base, "train.fault_inject": "kill:1:50"})
    result = run_pipeline(faulty, spark=spark, progress=events.append)

    starts = [e for e in events if e["event"] == "start"]
    assert [e["attempt"] for e in starts] == [0, 1]
    assert starts[1]["resumed_from"] == [0, 40]  # the checkpoint at step 40, not step 0
    assert any(e["event"] == "retry" for e in events)
    assert any(e["event"] == "rank_failed" for e in events)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["training.attempts"] == "2"
    # The same seed and the same batches from step 40 on: the same model as without the fault.
    assert result.metrics["val_accuracy"] == pytest.approx(clean.metrics["val_accuracy"], abs=0.005)
    assert np.isclose(result.metrics["val_loss"], clean.metrics["val_loss"], atol=0.005)
    assert len(result.history) == 2
    artifacts = {a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id)}
    assert "checkpoint" in artifacts
