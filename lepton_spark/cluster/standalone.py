"""A Spark standalone cluster on this machine, from the pyspark install: a master and N workers.

For trying the cluster path (``lepton-spark cluster up`` / ``make cluster-up``) and for the tests:
every process binds to 127.0.0.1, each worker has its own work folder and log, and the cluster's
state (pids, master URL) is kept in ``folder/cluster.json`` so that ``down`` can stop it from
another process. ``secret`` switches on Spark's authentication and RPC encryption for the master
and the workers (the application must then be given the same secret).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_spark.errors import ClusterError

STATE_FILE = "cluster.json"
PROPERTIES_FILE = "spark-secure.conf"
# What an application sets to join a cluster started with a secret (the secret itself aside).
SECURE_PROPERTIES = {
    "spark.authenticate": "true",
    "spark.network.crypto.enabled": "true",
    "spark.io.encryption.enabled": "true",
}


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class StandaloneCluster:
    folder: Path
    workers: int = 2
    cores_per_worker: int = 1
    memory_per_worker: str = "2g"
    host: str = "127.0.0.1"
    secret: str | None = field(default=None, repr=False)
    port: int = 0
    webui_port: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOG_DIR": str(self.folder)}
        options = [f"-Dspark.worker.cleanup.enabled=false -Djava.io.tmpdir={self.folder}"]
        if self.secret:
            # Daemons read these from the environment (not their command line, which ps shows).
            options.append("-Dspark.authenticate=true -Dspark.network.crypto.enabled=true")
            env["_SPARK_AUTH_SECRET"] = self.secret
        env["SPARK_DAEMON_JAVA_OPTS"] = " ".join(options)
        return env

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - the daemon owns it
        proc = subprocess.Popen(
            [str(spark_home() / "bin" / "spark-class"), *args],
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the command that started it; stopped as a group
        )
        log.close()
        self.pids.append(proc.pid)

    def start(self, timeout_s: float = 90.0) -> StandaloneCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        self.webui_port = self.webui_port or free_port(self.host)
        self._spawn(
            "master",
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--webui-port",
                str(self.webui_port),
            ],
        )
        for i in range(self.workers):
            work = self.folder / f"worker-{i}"
            work.mkdir(exist_ok=True)
            self._spawn(
                f"worker-{i}",
                [
                    "org.apache.spark.deploy.worker.Worker",
                    "--host",
                    self.host,
                    "--cores",
                    str(self.cores_per_worker),
                    "--memory",
                    self.memory_per_worker,
                    "--work-dir",
                    str(work),
                    "--webui-port",
                    str(free_port(self.host)),
                    self.master_url,
                ],
            )
        self.save()
        try:
            self._wait_for_workers(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def write_properties(self, path: Path | None = None) -> Path:
        """The Spark properties an application needs to join this cluster (its secret,
        authentication and encryption on) in a file only this user can read (0600), for
        ``spark-submit --properties-file`` and ``spark.properties_file``."""
        if not self.secret:
            raise ClusterError("this cluster was started without a secret: nothing to write")
        path = path or self.folder / PROPERTIES_FILE
        lines = {**SECURE_PROPERTIES, "spark.authenticate.secret": self.secret}
        text = "".join(f"{key} {value}\n" for key, value in lines.items())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        path.chmod(0o600)  # an existing file keeps its mode through O_CREAT
        return path

    def status(self) -> dict[str, Any]:
        url = f"http://{self.host}:{self.webui_port}/json/"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    def _wait_for_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        alive = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                alive = int(self.status().get("aliveworkers", 0))
                if alive >= self.workers:
                    return
            time.sleep(0.5)
        raise ClusterError(
            f"{alive} of {self.workers} workers registered with {self.master_url} within "
            f"{timeout_s:.0f} s; see the logs in {self.folder}"
        )

    def save(self) -> None:
        state = {
            "master_url": self.master_url,
            "webui": f"http://{self.host}:{self.webui_port}",
            "port": self.port,
            "webui_port": self.webui_port,
            "workers": self.workers,
            "pids": self.pids,
        }
        (self.folder / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, folder: Path) -> StandaloneCluster | None:
        path = folder / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return cls(
            folder=folder,
            workers=state["workers"],
            port=state["port"],
            webui_port=state["webui_port"],
            pids=state["pids"],
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the workers, then the master (their whole process groups: executors too).

        Only pids that are still Spark daemons are signalled: a stale ``cluster.json`` (after a
        reboot) must not take down whatever process got the same pid since.
        """
        self.pids = [pid for pid in self.pids if _is_spark_daemon(pid)]
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for pid in self.pids:
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.1)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self.pids = []
        (self.folder / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_spark_daemon(pid: int) -> bool:
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "org.apache.spark.deploy." in command


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (reaped here when it is our child and has ended)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
