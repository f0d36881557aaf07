"""One rank, one child process: the file protocol between a barrier task and its rank.

The task writes the pickled function and :class:`~lepton_spark.cluster.task.RankContext` to
``IN_FILE`` in a fresh work folder and starts ``python -m lepton_spark.cluster.rank_main WORKDIR``
with the rank's environment; the child writes ``OUT_FILE`` (``(rank, result)``, pickled) or
``ERROR_FILE`` (and ``INPUT_ERROR_MARK`` when the error was bad input), its output going to
``LOG_FILE``. A child process keeps Horovod's global state, torch threads and crashes out of
Spark's reused Python worker, and dies with its task (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cloudpickle

from lepton_spark.errors import BarrierError, RankInputError

IN_FILE = "in.pkl"  # the pickled function, then the pickled RankContext
OUT_FILE = "out.pkl"  # (rank, result), pickled; written whole (a rename) on success
ERROR_FILE = "error.txt"  # "<Type>: <message>", a blank line, the traceback
INPUT_ERROR_MARK = "input_error"  # present when the rank failed on bad input (no retry helps)
LOG_FILE = "rank.log"  # the child's stdout and stderr
ENTRY_MODULE = "lepton_spark.cluster.rank_main"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_child(payload: bytes, ctx: Any, env: dict[str, str]) -> bytes:
    """Run the pickled ``fn(ctx)`` in a child interpreter; its pickled result, or raise."""
    work = Path(tempfile.mkdtemp(prefix=f"lepton-rank{ctx.rank}-"))
    try:
        (work / IN_FILE).write_bytes(payload + cloudpickle.dumps(ctx))
        child_env = {**os.environ, **env}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(work / LOG_FILE, "wb") as out:
            code = subprocess.call(
                [sys.executable, "-m", ENTRY_MODULE, str(work)],
                env=child_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        result = work / OUT_FILE
        if code == 0 and result.is_file():
            return result.read_bytes()
        error = RankInputError if (work / INPUT_ERROR_MARK).exists() else BarrierError
        raise error(failure_message(ctx.rank, ctx.slot.host, code, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def failure_message(rank: int, host: str, code: int, work: Path) -> str:
    """What killed the rank, in a line a person reads: its error, or its signal and last words."""
    where = f"rank {rank} on {host}"
    error = work / ERROR_FILE
    if error.is_file():
        return f"{where} failed: {error.read_text().strip()}"
    tail = (work / LOG_FILE).read_text(errors="replace").strip().splitlines()[-20:]
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        reason = f"was killed by {name}" + (
            " (out of memory, or killed from outside)" if -code == signal.SIGKILL else ""
        )
    else:
        reason = f"exited with code {code}"
    return f"{where} {reason}\nlast lines of its log:\n" + "\n".join(tail)
