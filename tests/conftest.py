"""Shared fixtures: one real local Spark session for the whole run, helpers for shard folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Executors and rank processes run this interpreter, whatever is first on PATH.
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def spark() -> Iterator:
    from lepton_spark.config import SparkConfig
    from lepton_spark.etl import spark_session

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
def mlflow_server(tmp_path):
    """An ``mlflow server`` on 127.0.0.1 (its own sqlite store and artifact folder); its URL."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
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
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
