"""A Spark Connect server on this machine, from the pyspark install, bound to 127.0.0.1.

What ``sbin/start-connect-server.sh`` starts (``spark-submit --class
org.apache.spark.sql.connect.service.SparkConnectServer``), in the foreground of a process group
of its own, so that ``stop`` ends it and its Python workers. For trying lepton-spark over Spark
Connect (``lepton-spark connect up``), the tests and ``benchmarks/connect_vs_classic``. The
server's executors run this interpreter (``PYSPARK_PYTHON``), so they import the same
lepton-spark; its state (pid, port) is kept in ``folder/connect.json`` for ``down``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lepton_spark.cluster.standalone import alive, free_port, spark_home
from lepton_spark.errors import ClusterError

STATE_FILE = "connect.json"
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"

# Loopback only, no UI, and a barrier stage that cannot get its slots fails in seconds (these are
# the server's settings: a Connect client cannot change them).
DEFAULT_CONF = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "2",
    "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "2s",
    # A barrier sync (the stage's allGather of the rendezvous port) that some task never reaches
    # fails in an hour, not in Spark's default year: a bound that holds with no event channel.
    "spark.barrier.sync.timeout": "3600s",
}


@dataclass
class ConnectServer:
    folder: Path
    master: str = "local[2]"
    host: str = "127.0.0.1"
    port: int = 0
    conf: dict[str, str] = field(default_factory=dict)
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"sc://{self.host}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> ConnectServer:
        """Start the server and wait until it listens. A port picked here (``port`` 0) is free
        when picked, not always when the server binds it: when the server exits before it
        listens because another process took the port, it is started again on another port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        picked = not self.port
        for _ in range(3 if picked else 1):
            if picked:
                self.port = free_port(self.host)
            proc = self._spawn()
            try:
                if self._wait(proc, timeout_s):
                    return self
            except BaseException:
                self.stop()
                raise
            if not self._port_taken():
                break
        self.stop()
        raise ClusterError(
            f"the Spark Connect server exited with code {proc.returncode}; see "
            f"{self.folder / 'server.log'}"
        )

    def _port_taken(self) -> bool:
        """Whether the server's log says it could not bind its port (Spark's own message:
        ``java.net.BindException: Failed to bind to address ...``)."""
        log = self.folder / "server.log"
        return log.is_file() and "java.net.BindException" in log.read_text(errors="replace")

    def _spawn(self) -> subprocess.Popen:
        conf = {
            **DEFAULT_CONF,
            "spark.connect.grpc.binding.address": self.host,
            "spark.connect.grpc.binding.port": str(self.port),
            "spark.local.dir": str(self.folder / "tmp"),
            **self.conf,
        }
        command = [str(spark_home() / "bin" / "spark-submit"), "--class", SERVER_CLASS]
        command += ["--master", self.master, "--name", "lepton-spark connect"]
        for key, value in conf.items():
            command += ["--conf", f"{key}={value}"]
        env = {
            **os.environ,
            "SPARK_HOME": str(spark_home()),
            "PYSPARK_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": self.host,
        }
        for var in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED"):  # a client's, not ours
            env.pop(var, None)
        with open(self.folder / "server.log", "wb") as log:
            proc = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.folder,
            )
        self.pid = proc.pid
        self.save()
        return proc

    def _wait(self, proc: subprocess.Popen, timeout_s: float) -> bool:
        """``True`` once the server listens on its port (itself: not another process that took
        the port), ``False`` if it exited first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if _listening(proc.pid, self.port):
                return True
            time.sleep(0.5)
        raise ClusterError(
            f"the Spark Connect server did not listen on {self.host}:{self.port} within "
            f"{timeout_s:.0f} s; see {self.folder / 'server.log'}"
        )

    def save(self) -> None:
        state = {"url": self.url, "port": self.port, "pid": self.pid, "master": self.master}
        (self.folder / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, folder: Path) -> ConnectServer | None:
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return cls(folder=folder, port=state["port"], pid=state["pid"], master=state["master"])

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the server and everything it started (its process group)."""
        if self.pid is not None and _is_connect_server(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and alive(self.pid):
                time.sleep(0.2)
            if alive(self.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
        self.pid = None
        (self.folder / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> ConnectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` (the server's JVM: spark-submit execs it) or one it started
    listens on TCP ``port``."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in family:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return True
    return False


def _is_connect_server(pid: int) -> bool:
    import psutil

    try:
        return SERVER_CLASS in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
