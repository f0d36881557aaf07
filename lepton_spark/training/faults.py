"""Fault injection for the tests and the recovery benchmark: a rank killed or hung on purpose.

Off unless ``train.fault_inject`` or ``LEPTON_FAULT_INJECT`` says ``kill:RANK:STEP`` or
``hang:RANK:STEP``; it hits only the first attempt, so that a retry can succeed.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from lepton_spark.config import TrainConfig

log = logging.getLogger(__name__)

FAULT_ENV = "LEPTON_FAULT_INJECT"


def planned_fault(cfg: TrainConfig, attempt: int, rank: int) -> tuple[str, int] | None:
    """The fault (``kill`` or ``hang``) and the global step it hits this rank at, if any."""
    fault = cfg.fault_inject or os.environ.get(FAULT_ENV)
    if not fault or attempt != 0:
        return None
    kind, fault_rank, fault_step = fault.split(":")
    return (kind, int(fault_step)) if int(fault_rank) == rank else None


def inject_fault(kind: str, rank: int, global_step: int) -> None:
    """``kill``: SIGKILL this rank's process (as the OOM killer would); ``hang``: sleep forever."""
    log.warning("injected fault %r on rank %d at step %d", kind, rank, global_step)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
