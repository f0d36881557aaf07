"""Run a function on ``num_workers`` ranks inside one Spark barrier stage: the driver's side.

``run_barrier(spark, fn, num_workers)`` checks the slots, opens the event channel, submits
``DataFrame.mapInArrow(task, barrier=True)`` over one row per rank
(:mod:`lepton_spark.cluster.task`), feeds heartbeats to the stall watch, and returns the ranks'
results in rank order. The same code path on classic Spark and on Spark Connect: no RDD, no
SparkContext; the stage is cancelled through its operation tag (``SparkSession.interruptTag``). A
failed rank becomes a :class:`BarrierError` with that rank's own message (or
:class:`RankInputError` for bad input, :class:`StallError` when a stall watch stopped it); Ctrl-C
and SIGTERM cancel the stage and end as ``KeyboardInterrupt``.
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
from lepton_spark.cluster.child import Watch
from lepton_spark.cluster.interrupts import interrupted, on_interrupt
from lepton_spark.cluster.slots import check_slots
from lepton_spark.cluster.task import (
    RESULT_SCHEMA,
    RankContext,
    TaskSettings,
    barrier_task,
    joined_results,
)
from lepton_spark.cluster.watchdog import StallWatch
from lepton_spark.errors import BarrierError, RankInputError, SlotsError, StallError
from lepton_spark.events import Dropped, Event, Heartbeat, RankFailed, Rendezvous
from lepton_spark.sparkinfo import events_host, is_connect

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
    events_host: str | None = None  # where ranks reach the driver (None: see sparkinfo)
    engine: str = "horovod"  # train.backend: what the tasks set up for their ranks
    stall_setting: str = "train.stall_timeout_s"  # the knob a stall message names
    warm_ranks: bool = True  # ranks forked from the executor's warm process (cluster/warm.py)

    @property
    def startup_s(self) -> float:
        """How long ranks may take to start: the rendezvous may wait the Gloo timeout."""
        return max(self.stall_timeout_s or 0.0, self.gloo_timeout_s + 30.0)

    @property
    def watch(self) -> Watch | None:
        """Each task's own bound on its rank: a backstop for when the driver hears nothing, so
        half as long again as the driver's stall watch (plus 5 s), which names the rank
        furthest behind when it hears the heartbeats."""
        if self.stall_timeout_s is None:
            return None
        return Watch(
            stall_timeout_s=1.5 * self.stall_timeout_s + 5.0,
            startup_s=1.5 * self.startup_s + 5.0,
            setting=self.stall_setting,
        )


class _Driver:
    """The driver's view of one stage: events in, failures kept, heartbeats to the stall watch."""

    def __init__(
        self,
        on_event: Callable[[Event], None] | None,
        watch: StallWatch | None,
        engine: str = "horovod",
    ) -> None:
        self.on_event = on_event
        self.watch = watch
        self.engine = engine
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
                "%s at %s:%s (rank 0's executor, for this stage only)",
                "Horovod rendezvous server"
                if self.engine == "horovod"
                else "torch.distributed store",
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
    tag = StageTag(spark)
    watch = (
        StallWatch(
            num_workers,
            timeout_s=settings.stall_timeout_s,
            startup_s=settings.startup_s,
            on_stall=lambda message: tag.cancel(),
            setting=settings.stall_setting,
        )
        if settings.stall_timeout_s is not None
        else None
    )
    driver = _Driver(on_event, watch, settings.engine)
    try:
        raw = _run_stage(spark, cloudpickle.dumps(fn), num_workers, tag, driver, settings)
    finally:
        if watch is not None:
            watch.close()
    results = [pickle.loads(payload) for payload in raw.values()]
    return [value for _, value in sorted(results, key=lambda rv: rv[0])]


class StageTag:
    """The tag the stage's job runs under, to cancel it from any thread: Spark Connect's
    operation tags (``interruptTag``), or on classic Spark the context's job tags
    (``cancelJobsWithTag``: a classic session's operation tags do not reach a job started from
    Python)."""

    def __init__(self, spark: Any) -> None:
        self.spark = spark
        self.name = f"lepton-barrier-{uuid.uuid4().hex[:8]}"
        self._connect = is_connect(spark)

    def __enter__(self) -> StageTag:
        if self._connect:
            self.spark.addTag(self.name)
        else:
            self.spark.sparkContext.addJobTag(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connect:
            self.spark.removeTag(self.name)
        else:
            self.spark.sparkContext.removeJobTag(self.name)

    def cancel(self) -> None:
        if self._connect:
            self.spark.interruptTag(self.name)
        else:
            self.spark.sparkContext.cancelJobsWithTag(self.name)


def _run_stage(
    spark: Any,
    payload: bytes,
    num_workers: int,
    tag: StageTag,
    driver: _Driver,
    settings: BarrierSettings,
) -> dict[int, bytes]:
    host = events_host(spark, settings.events_host)
    events = EventServer(host, driver)
    try:
        with events, _quiet_task_failures(spark):
            log.info("event channel at %s (signed messages only, for this stage)", events.where)
            unreachable = _probe_channel(spark, events.address)
            address: str | None = events.address
            if unreachable is not None:
                address = None  # nothing to wait for: rank 0's reports come back with its result
                log.warning(
                    "the executors cannot reach this driver's event channel at %s (%s): "
                    "training runs on; its progress and metrics reach MLflow when the stage "
                    "ends, and a rank that stops moving is stopped by its own task after "
                    "%s",
                    events.where,
                    unreachable,
                    settings.stall_setting,
                )
            task = barrier_task(
                payload,
                TaskSettings(
                    address,
                    settings.gloo_timeout_s,
                    settings.watch,
                    engine=settings.engine,
                    warm_ranks=settings.warm_ranks,
                ),
            )
            stage = spark.range(0, num_workers, 1, num_workers).mapInArrow(
                task, RESULT_SCHEMA, barrier=True
            )
            try:
                with tag, on_interrupt(tag.cancel):
                    rows = stage.collect()
                if interrupted():  # the signal came as the stage ended: stop here all the same
                    raise KeyboardInterrupt("interrupted during training")
            except KeyboardInterrupt:
                tag.cancel()
                _wait_for_tasks_to_end(spark, tag, timeout_s=10.0)  # the ranks go with their tasks
                raise
            except Exception as err:
                if interrupted():  # the signal handler cancelled the stage
                    _wait_for_tasks_to_end(spark, tag, timeout_s=10.0)
                    raise KeyboardInterrupt("interrupted during training") from None
                _wait_for_tasks_to_end(spark, tag)  # their slots free, their last words logged
                if driver.watch is not None and driver.watch.message is not None:
                    raise StallError(driver.watch.message) from None
                message, kind = _stage_failure(err, driver.failures)
                raise kind(message) from None
    finally:
        _report_dropped(events, driver)
    return joined_results(rows)


def _report_dropped(events: EventServer, driver: _Driver) -> None:
    """What the channel refused during the stage (forged, replayed, oversized ... messages):
    said, and handed on as a :class:`~lepton_spark.events.Dropped` event (a run metric)."""
    dropped = events.dropped
    if not dropped:
        return
    log.warning("event channel: refused %s during the stage", dropped)
    if driver.on_event is not None:
        try:
            driver.on_event(Dropped(counts=dropped))
        except Exception:  # a report about the channel must not fail the stage
            log.exception("could not record the event channel's refusals")


def _probe_channel(spark: Any, address: str) -> str | None:
    """Whether an executor reaches the event channel at ``address``: ``None``, or why not.

    One small task opens a connection and closes it, before the ranks are started, so that a
    firewall between the cluster and this driver is said at the start, not found out later.
    """
    import pyarrow as pa

    host, port, _ = address.rsplit(":", 2)

    def connect(batches: Any) -> Any:
        import socket as _socket

        for _ in batches:
            pass
        try:
            with _socket.create_connection((host, int(port)), timeout=5):
                error = ""
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
        yield pa.RecordBatch.from_pylist([{"error": error}])

    try:
        rows = spark.range(0, 1, 1, 1).mapInArrow(connect, "error string").collect()
    except Exception as err:  # the probe itself could not run: no verdict
        log.debug("could not probe the event channel: %s", err)
        return None
    return rows[0]["error"] or None


def _wait_for_tasks_to_end(spark: Any, tag: StageTag, timeout_s: float = 15.0) -> None:
    """After a failed stage, wait (a little) until Spark has killed the other ranks' tasks.

    Classic Spark tells (its status tracker, the stage's jobs by their tag); a Connect client
    cannot see tasks, and goes on: a retry's barrier stage waits for the slots by itself.
    """
    if is_connect(spark):
        return
    tracker = spark.sparkContext.statusTracker()
    # The job ids by tag are on Scala's tracker only (the Java one pyspark wraps has groups).
    by_tag = spark.sparkContext._jsc.sc().statusTracker()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = 0
        for job in by_tag.getJobIdsForTag(tag.name):
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
    if is_connect(spark):  # no JVM here: the server's log is the server's
        yield
        return
    try:
        jvm = spark.sparkContext._jvm
        configurator = jvm.org.apache.logging.log4j.core.config.Configurator
        manager = jvm.org.apache.logging.log4j.LogManager
        level = jvm.org.apache.logging.log4j.Level
    except Exception:  # no JVM access: leave logging as it is
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


# What a rank says when its collective failed because another rank went away (Horovod, Gloo,
# NCCL, torch.distributed): an echo of another rank's failure, not its cause.
_PEER_LOST = re.compile(
    r"Horovod has been shut down|HorovodInternalError|Connection closed by peer|"
    r"Connection reset by peer|Broken pipe|NCCL communicator was aborted|DistNetworkError|"
    r"DistBackendError"
)


def _peer_lost(error: str) -> bool:
    return bool(_PEER_LOST.search(error))


_FAILURES: dict[str, type[BarrierError]] = {
    "RankInputError": RankInputError,
    "StallError": StallError,
    "BarrierError": BarrierError,
}


def _stage_failure(
    err: BaseException, failures: list[RankFailed]
) -> tuple[str, type[BarrierError]]:
    """The failed rank's own message if one reported it, else the gist of Spark's error; and
    which kind of failure it was (bad input and stalls are told apart from errors).

    The cause is named, not its echo: a rank whose collective failed because a peer went away
    (:func:`_peer_lost`) often reports first, so the reports of the others are waited for
    (briefly) and the first that is not such an echo is the one told."""
    deadline = time.monotonic() + 2.0  # the ranks' reports may still be on their way
    while time.monotonic() < deadline and all(_peer_lost(f.error) for f in list(failures)):
        time.sleep(0.05)
    if failures:
        first = next((f for f in list(failures) if not _peer_lost(f.error)), failures[0])
        if first.stalled:
            return first.error, StallError
        return first.error, RankInputError if first.input_error else BarrierError
    text = str(err)
    found = re.search(
        r"(RankInputError|StallError|BarrierError): (rank \d+ .*?)(?:\n\s*at |\n\s*JVM |\Z)",
        text,
        re.S,
    )
    if found:
        return found.group(2).strip(), _FAILURES[found.group(1)]
    return "barrier stage failed: " + (text if len(text) < 2000 else text[:2000] + " …"), (
        BarrierError
    )
