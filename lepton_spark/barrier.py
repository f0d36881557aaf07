"""Run a function on ``num_workers`` Horovod ranks inside one Spark barrier stage.

``run_barrier(spark, fn, num_workers)`` submits ``rdd.barrier().mapPartitions`` with one task per
rank. In each task:

1. ``BarrierTaskContext.allGather`` shares every task's executor address; the slot plan (rank,
   local rank/size per host, cross rank/size) follows from it, the same on every task.
2. Rank 0 starts Horovod's Gloo rendezvous server bound to its executor's address (not 0.0.0.0),
   and a second ``allGather`` hands its port to the others.
3. Each task runs ``fn(RankContext)`` in a child Python process with the ``HOROVOD_*`` environment
   (and ``CUDA_VISIBLE_DEVICES`` from the GPUs Spark assigned the task). A child process keeps
   Horovod's global state, torch threads and crashes out of Spark's reused Python worker; it dies
   with its task.
4. A final barrier, then rank 0 stops the rendezvous server (also when anything failed).

A rank that fails makes its task raise with the rank, host and error; Spark then fails the whole
stage, and :class:`BarrierError` carries that rank's message to the caller.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle
import psutil

from lepton_spark.errors import InfrastructureError, InputError
from lepton_spark.events import ENV_VAR, Event, EventClient, EventServer
from lepton_spark.interrupts import interrupted, on_interrupt
from lepton_spark.rank_main import INPUT_ERROR_MARK
from lepton_spark.watchdog import StallWatch

log = logging.getLogger(__name__)

T = TypeVar("T")


class BarrierError(RuntimeError):
    """The barrier stage failed; the message names the rank and host when one failed."""


class RankInputError(BarrierError, InputError):
    """A rank found bad input (a shard that does not match its manifest, too few rows)."""


class SlotsError(BarrierError, InfrastructureError):
    """The cluster cannot run all ranks at once."""


class StallError(BarrierError, InfrastructureError):
    """No rank made progress within the stall timeout; the message names the ranks behind."""


@dataclass(frozen=True)
class Slot:
    """One rank's place in the job, as Horovod needs it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    host: str


@dataclass(frozen=True)
class RankContext:
    """What ``fn`` receives: its slot, its GPUs, and a way to report to the driver."""

    slot: Slot
    gpus: tuple[str, ...] = ()
    report: Callable[[Event], None] | None = field(default=None, compare=False)

    @property
    def rank(self) -> int:
        return self.slot.rank


def slot_plan(hosts: list[str]) -> list[Slot]:
    """Slots for ranks ``0..len(hosts)-1`` where rank ``r`` runs on ``hosts[r]``.

    Local rank counts the ranks before it on the same host; cross rank is the host's position among
    the hosts that have a rank with the same local rank.
    """
    order: list[str] = list(dict.fromkeys(hosts))
    local_rank: list[int] = []
    seen: dict[str, int] = {}
    for h in hosts:
        local_rank.append(seen.get(h, 0))
        seen[h] = local_rank[-1] + 1
    slots = []
    for r, h in enumerate(hosts):
        peers = [hh for hh in order if seen[hh] > local_rank[r]]
        slots.append(
            Slot(
                rank=r,
                size=len(hosts),
                local_rank=local_rank[r],
                local_size=seen[h],
                cross_rank=peers.index(h),
                cross_size=len(peers),
                host=h,
            )
        )
    return slots


def interface_for(address: str) -> str:
    """The network interface that holds ``address`` (Gloo binds to it)."""
    ip = socket.gethostbyname(address)
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    if ipaddress.ip_address(ip).is_loopback:
        return "lo"
    raise BarrierError(f"no network interface holds {address} ({ip}); set spark.driver.host?")


def horovod_env(slot: Slot, rendezvous: tuple[str, int], iface: str, timeout_s: int) -> dict:
    return {
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
        "HOROVOD_HOSTNAME": slot.host,
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous[0],
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous[1]),
        "HOROVOD_GLOO_IFACE": iface,
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(timeout_s),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }


class RendezvousService:
    """Horovod's Gloo rendezvous HTTP server, bound to one address, for one stage."""

    def __init__(self, host: str, slots: list[Slot]) -> None:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        self._httpd = RendezvousHTTPServer((host, 0), RendezvousHandler, 0)
        self._httpd.init(
            [
                SlotInfo(
                    hostname=s.host,
                    rank=s.rank,
                    local_rank=s.local_rank,
                    cross_rank=s.cross_rank,
                    size=s.size,
                    local_size=s.local_size,
                    cross_size=s.cross_size,
                )
                for s in slots
            ]
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="horovod-rendezvous", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


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


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_child(payload: bytes, ctx: RankContext, env: dict[str, str]) -> bytes:
    """Run the pickled ``fn(ctx)`` in a child interpreter; its pickled result, or raise."""
    work = Path(tempfile.mkdtemp(prefix=f"lepton-rank{ctx.rank}-"))
    try:
        (work / "in.pkl").write_bytes(payload + cloudpickle.dumps(ctx))
        child_env = {**os.environ, **env}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(work / "rank.log", "wb") as out:
            code = subprocess.call(
                [sys.executable, "-m", "lepton_spark.rank_main", str(work)],
                env=child_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        result = work / "out.pkl"
        if code == 0 and result.is_file():
            return result.read_bytes()
        error = RankInputError if (work / INPUT_ERROR_MARK).exists() else BarrierError
        raise error(_failure_message(ctx, code, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _failure_message(ctx: RankContext, code: int, work: Path) -> str:
    where = f"rank {ctx.rank} on {ctx.slot.host}"
    error = work / "error.txt"
    if error.is_file():
        return f"{where} failed: {error.read_text().strip()}"
    tail = (work / "rank.log").read_text(errors="replace").strip().splitlines()[-20:]
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        reason = f"was killed by {name}" + (
            " (out of memory, or killed from outside)" if -code == signal.SIGKILL else ""
        )
    else:
        reason = f"exited with code {code}"
    return f"{where} {reason}\nlast lines of its log:\n" + "\n".join(tail)


def _barrier_task(payload: bytes, events: str | None, settings: BarrierSettings):
    def task(_: Iterator[Any]) -> Iterator[bytes]:
        from pyspark import BarrierTaskContext

        tc = BarrierTaskContext.get()
        rank = tc.partitionId()
        host = tc.getTaskInfos()[rank].address.rsplit(":", 1)[0]
        hosts = [json.loads(m)["host"] for m in tc.allGather(json.dumps({"host": host}))]
        slots = slot_plan(hosts)
        client = EventClient(events) if events else None
        server = None
        try:
            if rank == 0:
                server = RendezvousService(host, slots)
                if client:
                    rdv_host, rdv_port = server.address
                    client.send({"event": "rendezvous", "host": rdv_host, "port": rdv_port})
            message = json.dumps({"port": server.address[1] if server else None})
            port = json.loads(tc.allGather(message)[0])["port"]
            gpus = tuple(tc.resources()["gpu"].addresses) if "gpu" in tc.resources() else ()
            env = horovod_env(
                slots[rank], (hosts[0], port), interface_for(host), settings.gloo_timeout_s
            )
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            if events:
                env[ENV_VAR] = events
            try:
                result = _run_child(payload, RankContext(slot=slots[rank], gpus=gpus), env)
            except BarrierError as err:
                if client:
                    client.send(
                        {
                            "event": "rank_failed",
                            "rank": rank,
                            "error": str(err),
                            "input_error": isinstance(err, InputError),
                        }
                    )
                raise
            tc.barrier()  # everyone is done with the rendezvous server
        finally:
            if server is not None:
                server.stop()
            if client is not None:
                client.close()
        yield result

    return task


def available_slots(spark: Any) -> int:
    """How many tasks the cluster can run at once right now (what a barrier stage needs)."""
    sc = spark.sparkContext
    try:
        jsc = sc._jsc.sc()
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # not every deployment exposes it; local mode always does
        return int(sc.defaultParallelism)


def check_slots(
    spark: Any, num_workers: int, device: str = "auto", wait_s: float | None = None
) -> None:
    """Fail now, not after waiting forever, when the ranks cannot all run at once.

    On a cluster, executors register a few seconds after the application starts: wait up to
    ``wait_s`` (default ``spark.scheduler.maxRegisteredResourcesWaitingTime``, 30 s) for enough
    of them. With ``spark.task.resource.gpu.amount`` set, Spark counts only slots with GPUs.
    """
    sc = spark.sparkContext
    conf = sc.getConf()
    task_gpus = float(conf.get("spark.task.resource.gpu.amount", "0"))
    local_gpus = None
    if device == "cuda" and sc.master.startswith("local"):
        import torch

        local_gpus = torch.cuda.device_count()
    if wait_s is None:
        wait_s = (
            0.0
            if sc.master.startswith("local")
            else _seconds(conf.get("spark.scheduler.maxRegisteredResourcesWaitingTime", "30s"))
        )
    deadline = time.monotonic() + wait_s
    while True:
        problem = slot_problem(
            num_workers, available_slots(spark), device, task_gpus, sc.master, local_gpus
        )
        if problem is None:
            return
        if time.monotonic() >= deadline or "train.device is 'cuda'" in problem:
            raise SlotsError(problem)
        log.info("waiting for executors to register: %s", problem)
        time.sleep(1.0)


def _seconds(duration: str) -> float:
    """Spark's duration strings: ``30s``, ``2min``, ``500ms``, ``1h``; a bare number is ms."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*", duration)
    if not found:
        return 30.0
    value, unit = float(found.group(1)), found.group(2) or "ms"
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[unit]


def slot_problem(
    num_workers: int,
    slots: int,
    device: str,
    task_gpus: float,
    master: str,
    local_gpus: int | None = None,
) -> str | None:
    """What stops ``num_workers`` ranks from running at once (``None``: nothing).

    In local mode Spark does not hand out GPUs: the ranks share this machine's (``local_gpus``).
    """
    if device == "cuda" and master.startswith("local"):
        if not local_gpus:
            return "train.device is 'cuda' but this machine has no CUDA device (local mode)"
    elif device == "cuda" and task_gpus <= 0:
        return (
            "train.device is 'cuda' but Spark assigns no GPUs to tasks: set "
            "spark.task.resource.gpu.amount (and spark.executor.resource.gpu.amount with a "
            "discovery script), or use train.device: auto"
        )
    if num_workers > slots:
        what = "task slots with GPUs" if task_gpus > 0 else "task slots"
        return (
            f"train.num_workers={num_workers} ranks need {num_workers} {what} at once, but "
            f"the cluster ({master}) has {slots}; lower train.num_workers or add executors/"
            + ("GPUs" if task_gpus > 0 else "cores")
        )
    return None


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
    payload = cloudpickle.dumps(fn)
    failures: list[Event] = []
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

    def handle(event: Event) -> None:
        if event.get("event") == "rank_failed":
            failures.append(event)
        elif event.get("event") == "heartbeat":
            if watch is not None:
                watch.observe(event)
            return
        elif event.get("event") == "rendezvous":
            log.info(
                "Horovod rendezvous server at %s:%s (rank 0's executor, for this stage only)",
                event["host"],
                event["port"],
            )
        if on_event is not None:
            on_event(event)

    try:
        raw = _run_stage(sc, spark, payload, num_workers, group, handle, failures, watch, settings)
    finally:
        if watch is not None:
            watch.close()
    results = [pickle.loads(r) for r in raw]
    return [value for _, value in sorted(results, key=lambda rv: rv[0])]


def _run_stage(
    sc: Any,
    spark: Any,
    payload: bytes,
    num_workers: int,
    group: str,
    handle: Callable[[Event], None],
    failures: list[Event],
    watch: StallWatch | None,
    settings: BarrierSettings,
) -> list[bytes]:
    driver_host = sc.getConf().get("spark.driver.host", "127.0.0.1")
    with EventServer(driver_host, handle) as events, _quiet_task_failures(spark):
        task = _barrier_task(payload, events.address, settings)
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
            if watch is not None and watch.message is not None:
                raise StallError(watch.message) from None
            message, input_error = _stage_failure(err, failures)
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


def _stage_failure(err: BaseException, failures: list[Event]) -> tuple[str, bool]:
    """The failed rank's own message if one reported it, else the gist of Spark's error; and
    whether it was bad input (not worth a retry)."""
    deadline = time.monotonic() + 2.0  # the rank's report may still be on its way
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    if failures:
        return str(failures[0]["error"]), bool(failures[0].get("input_error"))
    text = str(err)
    found = re.search(
        r"(Rank(?:Input)?Error|BarrierError): (rank \d+ .*?)(?:\n\s*at |\Z)", text, re.S
    )
    if found:
        return found.group(2).strip(), found.group(1) == "RankInputError"
    return "barrier stage failed: " + (text if len(text) < 2000 else text[:2000] + " …"), False
