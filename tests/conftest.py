"""Shared fixtures: one real local Spark session for the whole run, helpers for shard folders."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Executors and rank processes run this interpreter, whatever is first on PATH.
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]


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
