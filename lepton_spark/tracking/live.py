"""Rank 0's events as MLflow metrics and tags while training runs.

Metrics go through MLflow's asynchronous logger: queued here, sent in batches; nothing on the
ranks waits for the store (``benchmarks/tracking``: 0.3% of the ranks' CPU). Rank 0 also hands
its reports back with its result; :meth:`LiveMetrics.replay` logs the ones that never arrived
live (when the cluster cannot reach the driver's event channel), so the run's metrics are whole
either way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lepton_spark.events import Dropped, Epoch, Event, InvalidEvent, Progress, Start, decode
from lepton_spark.names import (
    EVENTS_DROPPED_PREFIX,
    TAG_RANKS_CODE,
    TAG_RANKS_DEVICE,
    TAG_RANKS_PER_ATTEMPT,
    TAG_RANKS_PRECISION,
    TRAIN_LOSS_STEP,
    TRAIN_RANKS,
    TRAIN_THROUGHPUT,
)
from lepton_spark.tracking.run import TrackedRun


class LiveMetrics:
    """An event handler: ``progress`` → per-step metrics, ``epoch`` → epoch metrics, ``start``
    → the ranks' device, precision and code as tags, and the ranks of each attempt."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run
        self._seen: set[tuple[str, int]] = set()
        self._dropped: Counter[str] = Counter()
        self._ranks: dict[int, int] = {}  # attempt → ranks it ran with

    def replay(self, reports: list[dict[str, Any]]) -> int:
        """Log the reports that did not arrive as they happened; how many there were."""
        missed = 0
        for data in reports:
            try:
                event = decode(data)
            except InvalidEvent:
                continue
            if self._key(event) not in self._seen:
                missed += 1
                self(event)
        return missed

    @staticmethod
    def _key(event: Event) -> tuple[str, int]:
        if isinstance(event, Progress):
            return ("progress", event.global_step)
        if isinstance(event, Epoch):
            return ("epoch", event.epoch)
        return (event.event, 0)

    def __call__(self, event: Event) -> None:
        self._seen.add(self._key(event))
        if isinstance(event, Progress):
            self.run.log_metrics(
                {TRAIN_LOSS_STEP: event.window_loss, TRAIN_THROUGHPUT: event.samples_per_second},
                step=event.global_step,
                wait=False,
            )
        elif isinstance(event, Epoch):
            self.run.log_metrics(event.metrics, step=event.epoch, wait=False)
        elif isinstance(event, Dropped):
            self._dropped.update(event.counts)  # summed over the stage's attempts
            self.run.log_metrics(
                {f"{EVENTS_DROPPED_PREFIX}{k}": float(n) for k, n in self._dropped.items()},
                step=0,
                wait=False,
            )
        elif isinstance(event, Start):
            self._ranks[event.attempt] = event.size
            self.run.set_tags(
                {
                    TAG_RANKS_DEVICE: event.device,
                    TAG_RANKS_PRECISION: event.precision,
                    TAG_RANKS_CODE: event.code,
                    TAG_RANKS_PER_ATTEMPT: ",".join(map(str, self._ranks.values())),
                }
            )
            self.run.log_metrics({TRAIN_RANKS: float(event.size)}, step=event.attempt, wait=False)
