"""Before a barrier stage: can the cluster run every rank at once? Fail in seconds if not.

A barrier stage needs all its slots at the same time; with too few it waits (and Spark retries
for minutes). :func:`check_slots` asks Spark how many tasks can run now and says what is there
and what was asked.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from lepton_spark.errors import SlotsError

log = logging.getLogger(__name__)


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
            else spark_seconds(conf.get("spark.scheduler.maxRegisteredResourcesWaitingTime", "30s"))
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
