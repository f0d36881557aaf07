"""Training checkpoints: where a run stands, written atomically by rank 0, read back safely.

A checkpoint holds the model's and optimizer's state, the learning-rate schedule's state, the
position (epoch, batches done in it, global step) and the metrics history so far. The loader's
order is a pure function of the seed and the epoch, so the position is all it needs to carry on
from the same batch. The file is written whole or not at all (temporary file, then a move) into
the run's checkpoint folder (a path or a ``pyarrow.fs`` URI), and read with
``torch.load(weights_only=True)``: tensors and plain values only, never arbitrary pickled objects.
No Spark, no MLflow.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lepton_spark.shards.storage import Location, locate

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Position:
    """Where training stands: ``step`` batches of ``epoch`` (0-based) are done."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Checkpoint:
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    size: int | None = None  # the ranks that wrote it (None: a checkpoint from before 0.3)


def save_checkpoint(folder: str | Path | Location, checkpoint: Checkpoint) -> Location:
    """Write ``checkpoint.pt`` into ``folder`` atomically; returns where it went."""
    place = locate(folder)
    place.fs.create_dir(place.path, recursive=True)
    payload = {
        "position": [
            checkpoint.position.epoch,
            checkpoint.position.step,
            checkpoint.position.global_step,
        ],
        "model": {k: v.detach().cpu() for k, v in checkpoint.model.items()},
        "optimizer": checkpoint.optimizer,
        "schedule": checkpoint.schedule,
        # JSON text: plain values only, whatever the metrics hold.
        "history": json.dumps(checkpoint.history),
        "size": checkpoint.size,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    target = place.child(CHECKPOINT_NAME)
    target.write_bytes_atomic(buffer.getvalue())
    return target


def load_checkpoint(folder: str | Path | Location) -> Checkpoint | None:
    """The checkpoint in ``folder``, or ``None`` when there is none yet."""
    target = locate(folder).child(CHECKPOINT_NAME)
    if not target.is_file():
        return None
    payload = torch.load(io.BytesIO(target.read_bytes()), weights_only=True, map_location="cpu")
    epoch, step, global_step = (int(v) for v in payload["position"])
    return Checkpoint(
        position=Position(epoch, step, global_step),
        model=payload["model"],
        optimizer=payload["optimizer"],
        schedule=payload["schedule"],
        history=json.loads(payload["history"]),
        size=payload.get("size"),
    )
