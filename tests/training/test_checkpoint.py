"""Checkpoints: written whole by rank 0, read back with torch's safe loader; sharded ones
(torch.distributed.checkpoint, FSDP's) read without unpickling arbitrary objects: the metadata
through an allow-list, the non-tensor values with ``torch.load(weights_only=True)``; a forged
``.metadata`` is refused, not run."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lepton_spark.training.checkpoint import (
    Checkpoint,
    Position,
    load_checkpoint,
    save_checkpoint,
    sharded_planner,
    sharded_reader,
)


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


def trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.ones(5, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_round_trips_through_the_safe_reader(tmp_path):
    model, optimizer = trained()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp_path))

    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=sharded_reader(str(tmp_path)), planner=sharded_planner())
    set_state_dict(
        fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    for got, want in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.02  # a non-tensor value, read back
    steps = [float(s["step"]) for s in fresh_optimizer.state.values()]
    assert steps == [3.0] * 4


class _Forged:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_forged_metadata_file_is_refused_not_run(tmp_path):
    model, optimizer = trained()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    folder = tmp_path / "ckpt"
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Forged(str(marker))))
    state = {"model": model.state_dict()}
    with pytest.raises(CheckpointException, match=r"may not hold posix\.mkdir"):
        dcp.load(state, storage_reader=sharded_reader(str(folder)), planner=sharded_planner())
    assert not marker.exists()
