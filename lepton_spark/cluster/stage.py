"""Run a function on ``num_workers`` ranks inside one Spark barrier stage: the driver's side.

``run_barrier(spark, fn, num_workers)`` checks the slots, opens the event channel, submits
``rdd.barrier().mapPartitions`` with one task per rank (:mod:`lepton_spark.cluster.task`), feeds
heartbeats to the stall watch, and returns the ranks' results in rank order. A failed rank
becomes a :class:`BarrierError` with that rank's own message (or :class:`RankInputError` for bad
input, :class:`StallError` when the stall watch cancelled the stage); Ctrl-C and SIGTERM cancel
the stage's job group and end as ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle

from lepton_spark.cluster.channel import EventServer
from lepton_spark.cluster.interrupts import interrupted, on_interrupt
from lepton_spark.cluster.slots import check_slots
from lepton_spark.cluster.task import RankContext, TaskSettings, barrier_task
from lepton_spark.cluster.watchdog import StallWatch
from lepton_spark.errors import BarrierError, RankInputError, SlotsError, StallError
from lepton_spark.events import Event, Heartbeat, RankFailed, Rendezvous

__all__ = [
    "BarrierError",
    "BarrierSettings",
    "RankContext",
    "RankInputError",
    "SlotsError",
    "StallError",
    "run_barrier",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BarrierSettings:
    gloo_timeout_s: int = 120  # Horovod's Gloo rendezvous and connection timeout
    # No rank moved for this long: the stage is failed. None: no stall watch (for functions that
    # send no heartbeats; train_rank does).
    stall_timeout_s: float | None = None
    slot_wait_s: float | None = None  # how long to wait for executors (None: Spark's setting)

    @property
    def startup_s(self) -> float:
        """How long ranks may take to start: the rendezvous may wait the Gloo timeout."""
        return max(self.stall_timeout_s or 0.0, self.gloo_timeout_s + 30.0)


class _Driver:
    """The driver's view of one stage: events in, failures kept, heartbeats to the stall watch."""

    def __init__(self, on_event: Callable[[Event], None] | None, watch: StallWatch | None) -> None:
        self.on_event = on_event
        self.watch = watch
        self.failures: list[RankFailed] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, Heartbeat):
            if self.watch is not None:
                self.watch.observe(event)
            return
        if isinstance(event, RankFailed):
            self.failures.append(event)
        elif isinstance(event, Rendezvous):
            log.info(
                "Horovod rendezvous server at %s:%s (rank 0's executor, for this stage only)",
                event.host,
                event.port,
            )
        if self.on_event is not None:
            self.on_event(event)


def run_barrier(
    spark: Any,
    fn: Callable[[RankContext], T],
    num_workers: int,
    on_event: Callable[[Event], None] | None = None,
    settings: BarrierSettings | None = None,
    device: str = "auto",
) -> list[T]:
    """Run ``fn`` on ``num_workers`` ranks in one barrier stage; results ordered by rank.

    ``on_event`` receives the ranks' reports (``ctx.report``) on the driver as they arrive.
    """
    settings = settings or BarrierSettings()
    check_slots(spark, num_workers, device, settings.slot_wait_s)
    sc = spark.sparkContext
    group = f"lepton-barrier-{uuid.uuid4().hex[:8]}"
    watch = (
        StallWatch(
            num_workers,
            timeout_s=settings.stall_timeout_s,
            startup_s=settings.startup_s,
            on_stall=lambda message: sc.cancelJobGroup(group),
        )
        if settings.stall_timeout_s is not None
        else None
    )
    driver = _Driver(on_event, watch)
    try:
        raw = _run_stage(spark, cloudpickle.dumps(fn), num_workers, group, driver, settings)
    finally:
        if watch is not None:
            watch.close()
    results = [pickle.loads(r) for r in raw]
    return [value for _, value in sorted(results, key=lambda rv: rv[0])]


def _run_stage(
    spark: Any,
    payload: bytes,
    num_workers: int,
    group: str,
    driver: _Driver,
    settings: BarrierSettings,
) -> list[bytes]:
    sc = spark.sparkContext
    driver_host = sc.getConf().get("spark.driver.host", "127.0.0.1")
    with EventServer(driver_host, driver) as events, _quiet_task_failures(spark):
        task = barrier_task(payload, TaskSettings(events.address, settings.gloo_timeout_s))
        sc.setJobGroup(group, f"lepton-spark: {num_workers} Horovod ranks", True)
        try:
            rdd = sc.parallelize(range(num_workers), num_workers).barrier().mapPartitions(task)
            with on_interrupt(lambda: sc.cancelJobGroup(group)):
                raw = rdd.collect()
            if interrupted():  # the signal came as the stage ended: stop here all the same
                raise KeyboardInterrupt("interrupted during training")
        except KeyboardInterrupt:
            sc.cancelJobGroup(group)
            _wait_for_tasks_to_end(sc, group, timeout_s=10.0)  # the ranks go with their tasks
            raise
        except Exception as err:
            if interrupted():  # the signal handler cancelled the stage
                _wait_for_tasks_to_end(sc, group, timeout_s=10.0)
                raise KeyboardInterrupt("interrupted during training") from None
            _wait_for_tasks_to_end(sc, group)  # their slots free, their last words logged
            if driver.watch is not None and driver.watch.message is not None:
                raise StallError(driver.watch.message) from None
            message, input_error = _stage_failure(err, driver.failures)
            raise (RankInputError if input_error else BarrierError)(message) from None
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)
    return raw


def _wait_for_tasks_to_end(sc: Any, group: str, timeout_s: float = 15.0) -> None:
    """After a failed stage, wait (a little) until Spark has killed the other ranks' tasks."""
    tracker = sc.statusTracker()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = 0
        for job in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job)
            for stage in info.stageIds if info else []:
                stage_info = tracker.getStageInfo(stage)
                active += stage_info.numActiveTasks if stage_info else 0
        if active == 0:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def _quiet_task_failures(spark: Any) -> Iterator[None]:
    """Keep Spark's own report of a failed rank (a Java stack trace around the Python one) off
    the console while the stage runs: the rank's message reaches the user through BarrierError."""
    try:
        jvm = spark.sparkContext._jvm
        configurator = jvm.org.apache.logging.log4j.core.config.Configurator
        manager = jvm.org.apache.logging.log4j.LogManager
        level = jvm.org.apache.logging.log4j.Level
    except Exception:  # no JVM access (Spark Connect): leave logging as it is
        yield
        return
    before = {name: manager.getLogger(name).getLevel() for name in _NOISY_ON_TASK_FAILURE}
    for name in _NOISY_ON_TASK_FAILURE:
        configurator.setLevel(name, level.OFF)
    try:
        yield
    finally:
        for name, old in before.items():
            configurator.setLevel(name, old)


_NOISY_ON_TASK_FAILURE = (
    "org.apache.spark.scheduler.TaskSetManager",
    "org.apache.spark.executor.Executor",
    "org.apache.spark.scheduler.DAGScheduler",
)


def _stage_failure(err: BaseException, failures: list[RankFailed]) -> tuple[str, bool]:
    """The failed rank's own message if one reported it, else the gist of Spark's error; and
    whether it was bad input (not worth a retry)."""
    deadline = time.monotonic() + 2.0  # the rank's report may still be on its way
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    if failures:
        return failures[0].error, failures[0].input_error
    text = str(err)
    found = re.search(
        r"(Rank(?:Input)?Error|BarrierError): (rank \d+ .*?)(?:\n\s*at |\Z)", text, re.S
    )
    if found:
        return found.group(2).strip(), found.group(1) == "RankInputError"
    return "barrier stage failed: " + (text if len(text) < 2000 else text[:2000] + " …"), False
