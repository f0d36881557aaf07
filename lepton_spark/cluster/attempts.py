"""A barrier stage with retries: the one retry and elastic policy of every stage that trains.

:func:`run_attempts` runs ``make(attempt, ranks)`` on ``ranks`` ranks (:func:`run_barrier`);
when a rank fails it runs the stage again, up to ``retries`` more times. A retry after a lost
executor waits for the slots of every rank as long as a start-up may take; then, elastic
(``min_workers`` below ``num_workers``), it goes on with the slots that are left if there are at
least ``min_workers``. Not retried: bad input (:class:`~lepton_spark.errors.InputError`), too
few slots (the cluster will not change by itself), interrupts. The pipeline's training stage
(``pipeline/steps.train_with_retries``) and ``lepton_spark.distributed.run`` both go through it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from lepton_spark.cluster.slots import elastic_ranks
from lepton_spark.cluster.stage import BarrierSettings, run_barrier
from lepton_spark.cluster.task import RankContext
from lepton_spark.errors import BarrierError, InputError, SlotsError
from lepton_spark.events import Event, Retry

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_attempts(
    spark: Any,
    make: Callable[[int, int], Callable[[RankContext], T]],
    *,
    num_workers: int,
    retries: int = 0,
    min_workers: int | None = None,
    settings: BarrierSettings | None = None,
    device: str = "auto",
    on_event: Callable[[Event], None] | None = None,
) -> tuple[list[T], int]:
    """The ranks' results (in rank order) and the attempts it took.

    ``make(attempt, ranks)`` is the function each rank of that attempt runs (0-based attempt;
    ``ranks`` may be fewer than ``num_workers`` on an elastic retry). ``on_event`` gets the
    ranks' events and a :class:`~lepton_spark.events.Retry` before each new attempt.
    """
    settings = settings or BarrierSettings()
    attempts = 1 + retries
    for attempt in range(attempts):
        wait = None if attempt == 0 else settings.startup_s
        ranks = num_workers
        try:
            if attempt > 0:
                least = min_workers or num_workers
                ranks = elastic_ranks(spark, num_workers, least, device, wait)
                wait = 0.0 if ranks < num_workers else wait
            results = run_barrier(
                spark,
                make(attempt, ranks),
                ranks,
                on_event=on_event,
                settings=dataclasses.replace(settings, slot_wait_s=wait),
                device=device,
            )
            return results, attempt + 1
        except BarrierError as err:
            if attempt + 1 == attempts or isinstance(err, InputError | SlotsError):
                raise
            log.warning(
                "attempt %d of %d failed: %s; running the stage again from the last checkpoint",
                attempt + 1,
                attempts,
                str(err).splitlines()[0],
            )
            if on_event is not None:
                on_event(Retry(attempt=attempt + 2, of=attempts))
    raise AssertionError("unreachable")
