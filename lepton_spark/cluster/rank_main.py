"""Entry point of one rank's child process (started by :mod:`lepton_spark.cluster.child`).

``python -m lepton_spark.cluster.rank_main WORKDIR`` reads ``IN_FILE`` (the pickled function,
then the pickled :class:`~lepton_spark.cluster.task.RankContext`), runs the function, and writes
``OUT_FILE`` or ``ERROR_FILE`` (and ``INPUT_ERROR_MARK`` for bad input) and a non-zero exit code,
then leaves at once (:func:`leave`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import cloudpickle

from lepton_spark.cluster.channel import ENV_VAR, EventClient
from lepton_spark.cluster.child import (
    ERROR_FILE,
    HEARTBEAT_FILE,
    IN_FILE,
    INPUT_ERROR_MARK,
    OUT_FILE,
)
from lepton_spark.cluster.warm import alive
from lepton_spark.errors import InputError
from lepton_spark.events import Event, Heartbeat


def _exit_when_orphaned(parent: int) -> None:
    """Portable backstop for PR_SET_PDEATHSIG: leave when the Spark task's process is gone."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(137)


def _exit_when_task_gone(task_pid: int) -> None:
    """A warm rank's child (:mod:`lepton_spark.cluster.warm`) is the server's, not the task's:
    leave when the task's process is gone."""
    while True:
        time.sleep(0.5)
        if not alive(task_pid):
            os._exit(137)


class _Reporter:
    """The rank's ``report``: events to the driver (when there is a channel), and the latest
    heartbeat position to ``HEARTBEAT_FILE`` for the task's own watch."""

    def __init__(self, work: Path, client: EventClient | None) -> None:
        self._file = work / HEARTBEAT_FILE
        self._client = client

    def __call__(self, event: Event) -> None:
        if isinstance(event, Heartbeat):
            tmp = self._file.with_suffix(".tmp")
            tmp.write_text(f"{event.epoch} {event.step} {int(event.doing)} {event.n}")
            tmp.replace(self._file)
        if self._client is not None:
            self._client.send(event)


def main(workdir: str, task_pid: int | None = None) -> int:
    """The rank: ``task_pid`` when this process was forked by the warm server, not started by
    the task itself."""
    work = Path(workdir)
    if task_pid is None:
        watch = threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True)
    else:
        watch = threading.Thread(target=_exit_when_task_gone, args=(task_pid,), daemon=True)
    watch.start()
    with open(work / IN_FILE, "rb") as f:
        fn = cloudpickle.load(f)
        ctx = cloudpickle.load(f)
    client = EventClient(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None
    ctx = dataclasses.replace(ctx, report=_Reporter(work, client))
    try:
        result = fn(ctx)
    except BaseException as err:
        text = f"{type(err).__name__}: {err}"
        (work / ERROR_FILE).write_text(text + "\n\n" + traceback.format_exc())
        if isinstance(err, InputError):
            (work / INPUT_ERROR_MARK).touch()
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    buffer = io.BytesIO()
    cloudpickle.dump((ctx.rank, result), buffer)
    tmp = work / (OUT_FILE + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(work / OUT_FILE)
    return 0


def leave(code: int) -> None:
    """Exit now that the result (or the error) is on disk: no interpreter teardown, which takes
    0.6 s with torch loaded (measured by ``benchmarks/launch.breakdown``) and is where a
    library's threads can still abort the process after its work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError, AttributeError):  # C stdio too (NCCL's, gloo's output)
        ctypes.CDLL(None).fflush(None)
    os._exit(code)


if __name__ == "__main__":
    leave(main(sys.argv[1]))
