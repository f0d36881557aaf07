"""One rank, one child process: the file protocol between a barrier task and its rank.

The task writes the pickled function and :class:`~lepton_spark.cluster.task.RankContext` to
``IN_FILE`` in a fresh work folder and starts ``python -m lepton_spark.cluster.rank_main WORKDIR``
with the rank's environment; the child writes ``OUT_FILE`` (``(rank, result)``, pickled) or
``ERROR_FILE`` (and ``INPUT_ERROR_MARK`` when the error was bad input), its output going to
``LOG_FILE``, and keeps its latest heartbeat position in ``HEARTBEAT_FILE``. A child process keeps
Horovod's global state, torch threads and crashes out of Spark's reused Python worker, and dies
with its task (``PR_SET_PDEATHSIG``).

With a :class:`Watch`, the task stops a child whose heartbeat position has not changed for
``stall_timeout_s`` (``startup_s`` before its first step): a hang ends in bounded time even when
the driver never hears the rank (a firewall between executors and the driver, a Connect client
the cluster cannot reach).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from lepton_spark.cluster.watchdog import RankState
from lepton_spark.errors import BarrierError, RankInputError, StallError
from lepton_spark.events import Phase

IN_FILE = "in.pkl"  # the pickled function, then the pickled RankContext
OUT_FILE = "out.pkl"  # (rank, result), pickled; written whole (a rename) on success
ERROR_FILE = "error.txt"  # "<Type>: <message>", a blank line, the traceback
INPUT_ERROR_MARK = "input_error"  # present when the rank failed on bad input (no retry helps)
LOG_FILE = "rank.log"  # the child's stdout and stderr
HEARTBEAT_FILE = "heartbeat"  # "epoch step doing n": the child's latest position, replaced whole
ENTRY_MODULE = "lepton_spark.cluster.rank_main"
POLL_S = 0.5


@dataclass(frozen=True)
class Watch:
    """How long a child may go without moving: ``startup_s`` before its first training step,
    ``stall_timeout_s`` after."""

    stall_timeout_s: float
    startup_s: float
    setting: str = "train.stall_timeout_s"  # the knob the message names


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_child(
    payload: bytes,
    ctx: Any,
    env: dict[str, str],
    watch: Watch | None = None,
    warm: bool = False,
) -> bytes:
    """Run the pickled ``fn(ctx)`` in a child interpreter; its pickled result, or raise.
    ``warm``: the child is forked from the executor's warm process
    (:mod:`lepton_spark.cluster.warm`) when it serves, else started afresh."""
    work = Path(tempfile.mkdtemp(prefix=f"lepton-rank{ctx.rank}-"))
    try:
        (work / IN_FILE).write_bytes(payload + cloudpickle.dumps(ctx))
        child_env = {**os.environ, **env}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        (work / LOG_FILE).touch(mode=0o600)
        with open(work / LOG_FILE, "ab") as out:
            child: Any = None
            if warm and sys.platform.startswith("linux"):
                from lepton_spark.cluster.warm import fork_child

                child = fork_child(work, child_env, work / LOG_FILE)
            if child is None:
                child = subprocess.Popen(
                    [sys.executable, "-m", ENTRY_MODULE, str(work)],
                    env=child_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            try:
                stalled = _wait(child, work, watch)
            except BaseException:  # the task is going (cancelled, interrupted): so is its rank
                child.kill()
                child.wait()
                raise
        if stalled is not None:
            raise StallError(f"rank {ctx.rank} on {ctx.slot.host} {stalled}")
        result = work / OUT_FILE
        if child.returncode == 0 and result.is_file():
            return result.read_bytes()
        error = RankInputError if (work / INPUT_ERROR_MARK).exists() else BarrierError
        raise error(failure_message(ctx.rank, ctx.slot.host, child.returncode, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait(child: Any, work: Path, watch: Watch | None) -> str | None:
    """Wait for the child to exit; with a watch, kill it once it stops moving, and say how."""
    if watch is None:
        child.wait()
        return None
    position, moved = _position(work), time.monotonic()
    while True:
        try:
            child.wait(timeout=POLL_S)  # back at once when the child exits
            return None
        except subprocess.TimeoutExpired:
            pass
        now_at = _position(work)
        if now_at != position:
            position, moved = now_at, time.monotonic()
            continue
        training = position is not None and not position.startswith("-1 ")
        limit = watch.stall_timeout_s if training else watch.startup_s
        idle = time.monotonic() - moved
        if idle >= limit:
            child.kill()
            child.wait()
            return (
                f"stalled: no progress for {idle:.0f} s (limit {limit:g} s, "
                f"{watch.setting}), stuck {_describe(position)}; stopped by its own task"
            )


def _describe(position: str | None) -> str:
    if position is None:
        return RankState().describe()
    epoch, step, doing, n = (int(v) for v in position.split())
    return RankState(epoch, step, Phase(doing), n).describe()


def _position(work: Path) -> str | None:
    try:
        return (work / HEARTBEAT_FILE).read_text()
    except OSError:
        return None


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
