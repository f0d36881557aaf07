"""What the driver hands a rank (:class:`TrainSpec`) and what it hands back (:class:`TrainResult`).

Both are plain, picklable dataclasses: they travel through the barrier task's child-process
protocol. No Spark, no MLflow.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lepton_spark.config import ModelConfig, TrainConfig
from lepton_spark.events import Event, encode

Report = Callable[[Event], None]  # rank 0's events to the driver


@dataclass(frozen=True)
class TrainSpec:
    """Everything a rank needs: where the shards are, and how to train."""

    shard_folder: str
    train: TrainConfig
    model: ModelConfig
    verify_shards: bool = True
    checkpoint_dir: str | None = None  # resume from / write checkpoints here (rank 0 writes)
    attempt: int = 0  # which attempt of the training stage this is (0: the first)


@dataclass
class TrainResult:
    rank: int
    size: int
    device: str
    steps_per_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: "epoch" + metrics
    confusion: list[list[int]] | None = None  # last validation: rows by label, columns predicted
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint it started at
    state_dict: bytes | None = None  # rank 0 only: torch.save of the model's state_dict
    # Rank 0's reports (events.encode), also kept here: the driver logs those it did not get
    # live (a cluster that cannot reach the driver's event channel).
    reports: list[dict[str, Any]] = field(default_factory=list)

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        if self.state_dict is None:
            raise ValueError(f"rank {self.rank} carries no weights; rank 0 does")
        return torch.load(io.BytesIO(self.state_dict), weights_only=True)

    @property
    def final_metrics(self) -> dict[str, float]:
        """The last epoch's metrics (k-means: the final centroids' costs)."""
        return {k: v for k, v in self.history[-1].items() if k != "epoch"} if self.history else {}


class Recorder:
    """Rank 0's ``report``: every event goes on to ``report`` and is kept (encoded) for the
    result. Bounded: at most ``limit`` events (the first ones, and every epoch's)."""

    def __init__(self, report: Report | None, limit: int = 20_000) -> None:
        self._report = report
        self._limit = limit
        self.kept: list[dict[str, Any]] = []

    def __call__(self, event: Event) -> None:
        if len(self.kept) < self._limit or event.event == "epoch":
            self.kept.append(encode(event))
        if self._report is not None:
            self._report(event)


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """``torch.save`` of a state dict, on the CPU (read by ``TrainResult.load_state_dict``)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def code_location() -> str:
    """Where this rank's lepton_spark came from (an installed package, or the wheel spark-submit
    shipped with ``--py-files``): the run's ``ranks.code`` tag."""
    return os.path.dirname(os.path.dirname(__file__))
