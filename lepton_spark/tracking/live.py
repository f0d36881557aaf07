"""Rank 0's events as MLflow metrics and tags while training runs.

Metrics go through MLflow's asynchronous logger: queued here, sent in batches; nothing on the
ranks waits for the store (``benchmarks/tracking``: 0.3% of the ranks' CPU).
"""

from __future__ import annotations

from lepton_spark.events import Epoch, Event, Progress, Start
from lepton_spark.names import (
    TAG_RANKS_CODE,
    TAG_RANKS_DEVICE,
    TAG_RANKS_PRECISION,
    TRAIN_LOSS_STEP,
    TRAIN_THROUGHPUT,
)
from lepton_spark.tracking.run import TrackedRun


class LiveMetrics:
    """An event handler: ``progress`` → per-step metrics, ``epoch`` → epoch metrics, ``start``
    → the ranks' device, precision and code as tags."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run

    def __call__(self, event: Event) -> None:
        if isinstance(event, Progress):
            self.run.log_metrics(
                {TRAIN_LOSS_STEP: event.window_loss, TRAIN_THROUGHPUT: event.samples_per_second},
                step=event.global_step,
                wait=False,
            )
        elif isinstance(event, Epoch):
            self.run.log_metrics(event.metrics, step=event.epoch, wait=False)
        elif isinstance(event, Start):
            self.run.set_tags(
                {
                    TAG_RANKS_DEVICE: event.device,
                    TAG_RANKS_PRECISION: event.precision,
                    TAG_RANKS_CODE: event.code,
                }
            )
