"""Shared fixtures (one real local Spark session for the whole run, Horovod, the CLI, an MLflow
server on loopback) and the markers that follow from them.

Markers are applied here, from the fixtures a test uses (directly or through other fixtures),
never by hand: ``spark`` (it starts Spark: the ``spark`` fixture here, or ``starts_spark`` for
another process, which the ``cli`` fixture uses), ``horovod`` (it starts Horovod ranks: the
``horovod`` fixture), ``unit`` (neither: plain Python, no JVM, no ranks). Two markers are set
by hand: ``slow`` on end-to-end runs, and ``connect`` on tests that hold on Spark Connect too.

``--spark-mode=connect`` (``make test`` runs it after the classic run) starts a Spark Connect
server from the pyspark install on 127.0.0.1, makes the ``spark`` fixture a Connect client of it,
and runs only the ``connect`` tests: the same test, once over classic Spark and once over
Connect. (One interpreter holds one kind of session: pyspark's own rule.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Executors and rank processes run this interpreter, whatever is first on PATH.
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Every process this test session starts (Spark, its workers, ranks, the CLI) inherits it: what
# tests.helpers.rank_processes looks for, so that another session's ranks on this machine are
# not counted as this one's.
os.environ.setdefault("LEPTON_TEST_SESSION", uuid.uuid4().hex)
# Object-store tests talk to an S3 API on 127.0.0.1 (the s3 fixture): credentials for that server
# only, and no AWS SDK here looks further (no instance-metadata lookups). Set before any Spark or
# server process starts, so executors inherit them.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# fixture → the markers a test using it gets
_MARKING_FIXTURES = {
    "spark": ("spark",),
    "starts_spark": ("spark",),
    "horovod": ("horovod",),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--spark-mode",
        choices=("classic", "connect"),
        default="classic",
        help="connect: the spark fixture is a Spark Connect client; only 'connect' tests run",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    connect = config.getoption("--spark-mode") == "connect"
    kept, dropped = [], []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        marks = {m for name, ms in _MARKING_FIXTURES.items() if name in used for m in ms}
        for mark in sorted(marks) or ["unit"]:
            item.add_marker(mark)
        (kept if not connect or item.get_closest_marker("connect") else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> str:
    return f"spark mode: {config.getoption('--spark-mode')}"


@pytest.fixture(scope="session")
def horovod():
    """Horovod's torch API; tests that start Horovod ranks ask for it (and get the marker)."""
    try:
        import horovod.torch as hvd
    except ImportError as err:  # a machine set up without scripts/install_horovod.sh
        pytest.skip(f"horovod is not installed ({err}); make setup builds it")
    return hvd


@pytest.fixture()
def starts_spark() -> None:
    """Nothing to set up: it says that the test starts Spark in another process (spark-submit,
    the CLI, a notebook kernel), for the ``spark`` marker."""


@pytest.fixture()
def cli(starts_spark: None):
    """``lepton-spark`` as a user runs it, in a subprocess: ``cli("run", path, cwd=...)``."""
    from tests.helpers import run_cli

    return run_cli


@pytest.fixture(scope="session")
def spark_mode(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--spark-mode"))


@pytest.fixture(scope="session")
def connect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A Spark Connect server (local[2]) on 127.0.0.1, from the pyspark install."""
    from lepton_spark.cluster.connect_server import ConnectServer

    server = ConnectServer(
        folder=tmp_path_factory.mktemp("connect"),
        master="local[2]",
        conf={"spark.sql.shuffle.partitions": "4"},
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spark(request: pytest.FixtureRequest, spark_mode: str) -> Iterator:
    from lepton_spark.config import SparkConfig
    from lepton_spark.data.session import spark_session

    if spark_mode == "connect":
        server = request.getfixturevalue("connect_server")
        session = spark_session(SparkConfig(remote=server.url))
        yield session
        session.stop()
        return
    session = spark_session(
        SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}),
        app_name="lepton-spark tests",
    )
    yield session
    session.stop()


@pytest.fixture()
def demo_config(tmp_path: Path):
    """The demo pipeline, shrunk to run in seconds, writing under ``tmp_path``."""
    from lepton_spark.config import load_config

    return load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {
            "sources.events.generate.rows": 30_000,
            "sources.events.generate.partitions": 4,
            "train.epochs": 2,
            "train.batch_size": 256,
            "shards.root": str(tmp_path / "shards"),
            "shards.rows_per_shard": 10_000,
            "tracking.local_store": str(tmp_path / "mlruns-data"),
        },
    )


@pytest.fixture(autouse=True)
def _no_tracking_uri_between_tests() -> Iterator[None]:
    """A test that points mlflow somewhere (to read a run back) does not send the next one there."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 (its own sqlite store and artifact folder); its URL."""
    yield from _mlflow_server(tmp_path, str(tmp_path / "server-artifacts"))


@pytest.fixture()
def mlflow_server_s3(tmp_path: Path, s3: S3) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 that keeps the artifacts it is sent in the ``s3``
    bucket (under ``mlflow/``); its URL."""
    yield from _mlflow_server(
        tmp_path, f"s3://{s3.bucket}/mlflow", {"MLFLOW_S3_ENDPOINT_URL": s3.url}
    )


def _mlflow_server(tmp_path: Path, artifacts: str, env: dict[str, str] | None = None):
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server

    def start(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'server.db'}",
                "--artifacts-destination",
                artifacts,
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, **(env or {})},
        )

    def healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10):
                return True
        except OSError:
            return False

    proc, port = _start_server(start, healthy, log_path, "the mlflow server", 120)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _start_server(
    start: Callable[[int], subprocess.Popen],
    up: Callable[[int], bool],
    log_path: Path,
    what: str,
    timeout_s: float,
) -> tuple[subprocess.Popen, int]:
    """``start(port)`` on a port picked here, and wait until the server listens there and is
    ``up(port)``; the process and its port. A port free when picked may be taken by another
    process before the server binds it: the server exits then, and is started on another."""
    for _ in range(3):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if _listens(proc.pid, port) and up(port):
                return proc, port
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=30)
                raise AssertionError(f"{what} did not come up: " + log_path.read_text()[-2000:])
            time.sleep(0.2)
    raise AssertionError(f"{what} exited: " + log_path.read_text()[-2000:])


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` or one it started listens on TCP ``port`` (and not some other
    process that took the port)."""
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


@dataclass(frozen=True)
class S3:
    """A bucket on the loopback S3 API."""

    endpoint: str  # host:port
    bucket: str

    def uri(self, key: str) -> str:
        """A ``pyarrow.fs`` URI (what ``shards.root``, ``score --output`` … take)."""
        return f"s3://{self.bucket}/{key}?endpoint_override={self.endpoint}&scheme=http"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-compatible server (moto's standalone mode) on 127.0.0.1; its ``host:port``."""
    log_path = tmp_path_factory.mktemp("s3") / "moto.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server

    def start(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    proc, port = _start_server(start, lambda port: True, log_path, "the S3 server", 90)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture()
def s3(s3_server: str) -> S3:
    """A fresh bucket on the loopback S3 API."""
    import boto3

    bucket = f"lepton-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://{s3_server}").create_bucket(Bucket=bucket)
    return S3(s3_server, bucket)
