"""The warm rank process: a fork server per executor, started once, with torch imported.

A fresh interpreter that imports torch costs every rank of every stage 2.5-3.5 s on 2 cores
(``benchmarks/launch.breakdown``). The first barrier task on an executor starts
``python -m lepton_spark.cluster.warm FOLDER WATCH_PID``: it imports torch, numpy, pyarrow and
the rank's side of lepton_spark (:data:`PRELOAD`), checks that it holds one thread and has not
touched CUDA, and serves a Unix socket in ``FOLDER`` (a ``0700`` folder of this user's; the
socket's path is known to every Python worker of the executor, :func:`server_folder`). Each
rank's child is then a ``fork`` of it (:class:`WarmChild`), milliseconds instead of seconds.

The risks of forking after import, and what holds them:

* **CUDA**: the server never initialises it (``torch.cuda`` is not called; the check refuses
  to serve if it was); the child initialises it after the fork, with its own
  ``CUDA_VISIBLE_DEVICES``.
* **Threads**: the server refuses to serve with more than one thread (``/proc/self/task``);
  torch's pools start lazily, in the child, after ``torch.set_num_threads``. Two libraries
  start a thread at import, so the server runs with ``OPENBLAS_NUM_THREADS=1`` (numpy's own
  BLAS is single-threaded in warm ranks; torch's operations are not affected) and
  ``JE_ARROW_MALLOC_CONF=background_thread:false`` (Arrow's allocator purges on the allocating
  thread), unless the environment sets them.
* **Secrets**: the server never reads a request. It forks on ``accept`` and the child reads the
  request (its environment, with the stage's secrets, and its work folder) from the socket, so
  no stage's secret is ever in the server's memory for a later stage's child to inherit. The
  child's environment is the request's alone: nothing of the server's or an earlier stage's.
* **Random state**: the child reseeds numpy's global generator from the OS, as a fresh
  interpreter would (Python's ``random`` reseeds itself at fork; torch's default seed is a
  constant in a fresh process too).
* **A server that dies** (killed, or its executor gone): the next task finds the socket dead
  and starts another; a server that cannot start makes the task fall back to a fresh
  interpreter (:mod:`lepton_spark.cluster.child`), with a warning.
* **Shared clusters**: the server leaves when the executor's process it watches is gone, and
  after :data:`IDLE_S` without a rank (one idle interpreter per executor, not per core).

``train.warm_ranks: false`` (``run(..., warm_ranks=False)``) turns it off: every rank a fresh
interpreter, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "fork.sock"
LOCK_NAME = "start.lock"
PID_NAME = "server.pid"  # the serving process's pid
LOG_NAME = "server.log"
REFUSED_NAME = "refused"  # a server that would not serve (unsafe to fork): why; not tried again
IDLE_S = float(os.environ.get("LEPTON_WARM_IDLE_S", "900"))  # leave after this long unused
START_S = 120.0  # the most a server may take to import what it preloads
PRELOAD = (
    "numpy",
    "pyarrow",
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "cloudpickle",
    "lepton_spark.cluster.rank_main",
    "lepton_spark.training.worker",
    "lepton_spark.distributed.rank",
)


def server_folder(watch_pid: int) -> Path:
    """The folder of the server for this user, this executor (``watch_pid``: the process
    whose end ends the server) and this Python with this ``sys.path`` (a server imports
    what the ranks would)."""
    key = hashlib.sha256(
        json.dumps([sys.executable, [p for p in sys.path if p], watch_pid]).encode()
    ).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"lepton-warm-{os.getuid()}" / key


def executor_pid() -> int:
    """The process a server outlives no longer: the Python worker's parent (Spark's
    ``pyspark.daemon``, one per executor, or the executor itself without the daemon)."""
    return os.getppid()


# Set for the server unless the environment has them: each of these libraries starts a thread
# at import otherwise (OpenBLAS its pool, Arrow's jemalloc its background purger).
# And torch.cuda.is_available(), should anything preloaded call it, asks NVML, not the CUDA
# driver (cuInit before a fork breaks CUDA in the children).
SERVER_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
}
UNSAFE_EXIT = 3

_warned: set[str] = set()  # folders this process has warned about

# -- the task's side ---------------------------------------------------------------------------


class WarmChild:
    """A rank's child forked by the server: ``wait``, ``kill``, ``returncode``, ``pid``, as a
    ``subprocess.Popen`` has them (the server tells its exit code over the socket)."""

    def __init__(self, conn: socket.socket, pid: int, said: bytes = b"") -> None:
        self._conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self._buffer = said
        self._read()

    def _read(self) -> None:
        for line in self._buffer.split(b"\n")[:-1]:
            kind, _, value = line.decode().partition(" ")
            if kind == "exit":
                self.returncode = int(value)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired("warm rank", timeout or 0)
            data = self._conn.recv(4096)
            if not data:  # the server died: so did its bookkeeping, not the child maybe
                self.kill()
                self.returncode = -signal.SIGKILL
                break
            self._buffer += data
            self._read()
        self._conn.close()
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def fork_child(workdir: Path, env: dict[str, str], log_path: Path) -> WarmChild | None:
    """Ask this executor's server (started here if needed) for a child running
    ``rank_main`` on ``workdir`` with exactly ``env``; ``None`` when no server can serve
    (the caller starts a fresh interpreter)."""
    folder = server_folder(executor_pid())
    try:
        conn = _connect(folder)
        request = {
            "workdir": str(workdir),
            "env": env,
            "log": str(log_path),
            "cwd": os.getcwd(),
            "sys_path": [p for p in sys.path if p],
            "task_pid": os.getpid(),
        }
        conn.sendall(json.dumps(request).encode() + b"\n")
        pid, said = _read_pid(conn)
    except (OSError, ValueError, TimeoutError) as err:
        if str(folder) not in _warned:
            _warned.add(str(folder))
            log.warning(
                "the warm rank process at %s could not start a rank (%s): fresh interpreters "
                "start them instead (train.warm_ranks: false skips the attempt)",
                folder,
                err,
            )
        return None
    return WarmChild(conn, pid, said)


def server_pid(folder: Path) -> int | None:
    """The pid of the server serving in ``folder``, or ``None``."""
    try:
        pid = int((folder / PID_NAME).read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def stop_server(folder: Path, timeout_s: float = 10.0) -> None:
    """Stop the server of ``folder`` (its ranks go with it) and wait for it to be gone."""
    pid = server_pid(folder)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _read_pid(conn: socket.socket) -> tuple[int, bytes]:
    """The child's pid, and whatever the server said after it (its exit, if it died at once)."""
    conn.settimeout(30.0)
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise OSError("the server closed the connection before the child started")
        data += chunk
    conn.settimeout(None)
    line, _, rest = data.partition(b"\n")
    kind, _, value = line.decode().partition(" ")
    if kind != "pid":
        raise ValueError(f"unexpected answer {line!r}")
    return int(value), rest


def _connect(folder: Path) -> socket.socket:
    """A connection to the server in ``folder``; started (once, under a lock) if none serves."""
    path = folder / SOCKET_NAME
    with contextlib.suppress(OSError):
        return _open(path)
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    for place in (folder.parent, folder):
        if place.stat().st_uid != os.getuid() or place.stat().st_mode & 0o077:
            raise OSError(f"{place} is not this user's alone (mode 0700): not using it")
    with open(folder / LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one task of the executor starts it, the others wait
        with contextlib.suppress(OSError):
            return _open(path)
        if (folder / REFUSED_NAME).is_file():
            raise OSError((folder / REFUSED_NAME).read_text().strip())
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead server's socket
        server = _start_server(folder)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                return _open(path)
            if server.poll() is not None:
                lines = (folder / LOG_NAME).read_text(errors="replace").strip().splitlines()
                why = f"the server exited with {server.returncode}: {(lines or [''])[-1]}"
                if server.returncode == UNSAFE_EXIT:
                    (folder / REFUSED_NAME).write_text(why)
                raise OSError(why)
            time.sleep(0.05)
        server.kill()
        raise TimeoutError(f"the server did not serve within {START_S:.0f} s")


def _open(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _secret_bearing(name: str) -> bool:
    """Variables the server is started without (a rank gets its own in its request): the
    stage's channel and rendezvous, and anything named like a credential."""
    upper = name.upper()
    return upper.startswith(("LEPTON_EVENTS", "LEPTON_TORCH_STORE", "HOROVOD_")) or any(
        word in upper for word in ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "_KEY")
    )


def _start_server(folder: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not _secret_bearing(k)}
    env = {**SERVER_ENV, **env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with open(folder / LOG_NAME, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", __name__, str(folder), str(executor_pid())],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the worker's process group: it outlives the task
            close_fds=True,
        )


# -- the server's side -------------------------------------------------------------------------


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def threads() -> int:
    """This process's threads (Python's and native ones)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def fork_safe() -> str | None:
    """Why this process must not fork ranks, or ``None``."""
    import torch

    if torch.cuda.is_initialized():
        return "CUDA was initialised while preloading"
    count = threads()
    if count > 1:
        return f"{count} threads run after preloading (a fork would copy their locks)"
    return None


def serve(folder: Path, watch_pid: int) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through the clean-up below
    preload()
    unsafe = fork_safe()
    if unsafe is not None:
        print(f"lepton-spark warm rank process: not serving: {unsafe}", flush=True)
        return UNSAFE_EXIT
    path = folder / SOCKET_NAME
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    (folder / PID_NAME).write_text(str(os.getpid()))
    children: dict[int, socket.socket] = {}
    last_used = time.monotonic()
    print(f"lepton-spark warm rank process {os.getpid()} serving {path}", flush=True)
    try:
        while True:
            # A child's exit is told to its task on the next turn: soon while ranks run.
            ready, _, _ = select.select([listener], [], [], 0.02 if children else 0.2)
            if ready:
                conn, _ = listener.accept()
                pid = os.fork()
                if pid == 0:  # the rank's child: never returns
                    listener.close()
                    for other in children.values():
                        other.close()
                    _child(conn)
                children[pid] = conn
                last_used = time.monotonic()
            _reap(children)
            if children:
                last_used = time.monotonic()
            elif time.monotonic() - last_used > IDLE_S or not alive(watch_pid):
                return 0
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        for pid in children:  # the server goes: so do the ranks it still has
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it has ended, reaped or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone, whether or not its parent has reaped it yet
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _child(conn: socket.socket) -> None:
    """In the forked child: the request read here (never by the server), then the rank."""
    code = 1
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                os._exit(1)
            data += chunk
        request: dict[str, Any] = json.loads(data)
        conn.sendall(f"pid {os.getpid()}\n".encode())
        conn.close()  # the server tells the exit code; the child keeps nothing of the socket
        os.environ.clear()
        os.environ.update(request["env"])
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.chdir(request["cwd"])
        sys.path[:] = request["sys_path"]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's handler is not the rank's
        os.setpgid(0, 0)  # a group of its own: nothing sent to the server's reaches it
        import numpy as np

        np.random.seed()  # fresh from the OS, as in a new interpreter
        from lepton_spark.cluster import rank_main

        code = rank_main.main(request["workdir"], task_pid=int(request["task_pid"]))
    except BaseException as err:  # the request itself was broken: say it in the rank's log
        with contextlib.suppress(Exception):
            print(f"lepton-spark warm rank: {type(err).__name__}: {err}", file=sys.stderr)
    from lepton_spark.cluster.rank_main import leave

    leave(code)


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), int(sys.argv[2])))
