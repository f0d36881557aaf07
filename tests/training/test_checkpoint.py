"""Checkpoints: written whole by rank 0, read back with torch's safe loader."""

from __future__ import annotations

import torch

from lepton_spark.training.checkpoint import Checkpoint, Position, load_checkpoint, save_checkpoint


def test_a_checkpoint_round_trips_through_a_safe_load(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    schedule.step()
    history = [{"epoch": 1, "val/accuracy": 0.5}]
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
