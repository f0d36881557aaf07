"""Before a barrier stage: can the cluster run every rank at once? Fail in seconds if not.

A barrier stage needs all its slots at the same time; with too few it waits (and Spark retries
for minutes). :func:`check_slots` asks Spark how many tasks can run now and says what is there
and what was asked. Classic Spark answers exactly (the scheduler's concurrent-task count); a
Spark Connect client asks what the server's configuration says (``local[N]``, executors × cores
÷ ``spark.task.cpus``, ``local[*]`` by asking an executor how many cores it has), and when the
configuration cannot tell, says so and leaves the last word to Spark's own barrier check.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from lepton_spark.errors import SlotsError
from lepton_spark.sparkinfo import conf_value, is_connect, local_cores, master_of

log = logging.getLogger(__name__)


def available_slots(spark: Any) -> int | None:
    """How many tasks the cluster can run at once right now (``None``: it cannot tell)."""
    if is_connect(spark):
        return _configured_slots(spark)
    sc = spark.sparkContext
    try:
        jsc = sc._jsc.sc()
        profile = jsc.resourceProfileManager().defaultResourceProfile()
        return int(jsc.maxNumConcurrentTasks(profile))
    except Exception:  # not every deployment exposes it; local mode always does
        return int(sc.defaultParallelism)


def _configured_slots(spark: Any) -> int | None:
    """A Connect server's slots from its configuration (and, for ``local[*]``, its cores)."""
    master = master_of(spark)
    task_cpus = int(conf_value(spark, "spark.task.cpus", "1") or 1)
    if master.startswith("local"):
        cores = local_cores(master) or _executor_cores(spark)
        return cores // task_cpus if cores else None
    dynamic = (conf_value(spark, "spark.dynamicAllocation.enabled", "false") or "") == "true"
    instances = conf_value(spark, "spark.executor.instances")
    cores = conf_value(spark, "spark.executor.cores")
    if not dynamic and instances and cores:
        return int(instances) * (int(cores) // task_cpus)
    cores_max = conf_value(spark, "spark.cores.max")  # standalone: the application's cap
    return int(cores_max) // task_cpus if cores_max else None


def _executor_cores(spark: Any) -> int | None:
    """How many cores an executor may use (one small task asks the OS: the CPUs this process may
    run on, which a container's cpuset limits, not the machine's count)."""
    import pyarrow as pa

    def ask(batches: Any) -> Any:
        import os as _os

        for _ in batches:
            pass
        try:
            cores = len(_os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = _os.cpu_count() or 0
        yield pa.RecordBatch.from_pylist([{"cores": cores}])

    try:
        rows = spark.range(0, 1, 1, 1).mapInArrow(ask, "cores long").collect()
        return int(rows[0]["cores"]) or None
    except Exception as err:
        log.debug("could not ask an executor for its cores: %s", err)
        return None


def check_slots(
    spark: Any, num_workers: int, device: str = "auto", wait_s: float | None = None
) -> None:
    """Fail now, not after waiting forever, when the ranks cannot all run at once.

    On a cluster, executors register a few seconds after the application starts: wait up to
    ``wait_s`` (default ``spark.scheduler.maxRegisteredResourcesWaitingTime``, 30 s) for enough
    of them. With ``spark.task.resource.gpu.amount`` set, Spark counts only slots with GPUs.
    """
    master = master_of(spark)
    task_gpus = float(conf_value(spark, "spark.task.resource.gpu.amount", "0") or 0)
    local_gpus = None
    if device == "cuda" and master.startswith("local"):
        import torch

        local_gpus = torch.cuda.device_count()
    if wait_s is None:
        waiting = conf_value(spark, "spark.scheduler.maxRegisteredResourcesWaitingTime", "30s")
        wait_s = 0.0 if master.startswith("local") else spark_seconds(waiting or "30s")
    if is_connect(spark):
        wait_s = 0.0  # the server's configuration does not change while we wait
    deadline = time.monotonic() + wait_s
    while True:
        slots = available_slots(spark)
        if slots is None:
            log.warning(
                "the Spark Connect server's configuration does not say how many task slots it "
                "has (%s); submitting %d ranks, and Spark's own barrier check fails the stage "
                "if they cannot all run at once",
                master or "no spark.master",
                num_workers,
            )
            slots = num_workers
        problem = slot_problem(num_workers, slots, device, task_gpus, master, local_gpus)
        if problem is None:
            return
        if time.monotonic() >= deadline or "train.device is 'cuda'" in problem:
            raise SlotsError(problem)
        log.info("waiting for executors to register: %s", problem)
        time.sleep(1.0)


def elastic_ranks(
    spark: Any, wanted: int, least: int, device: str = "auto", wait_s: float | None = None
) -> int:
    """How many ranks a retry can have: ``wanted`` when that many slots come within ``wait_s``,
    else the slots there are if at least ``least`` (``train.min_workers``); else the
    :class:`SlotsError` of too few."""
    try:
        check_slots(spark, wanted, device, wait_s)
        return wanted
    except SlotsError:
        slots = available_slots(spark) or 0
        if least >= wanted or slots < least:
            raise
        got = min(slots, wanted)
        log.warning(
            "%d of the %d ranks' slots are left (train.min_workers is %d): going on with %d ranks "
            "from the checkpoint",
            slots,
            wanted,
            least,
            got,
        )
        return got


def spark_seconds(duration: str) -> float:
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
