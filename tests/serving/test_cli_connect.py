"""The CLI as a Spark Connect client: ``--remote sc://HOST:PORT`` (a server started from the
pyspark install on 127.0.0.1), and a server that is not there named in seconds."""

from __future__ import annotations

import time

import pandas as pd

from tests.helpers import ROOT
from tests.serving.test_batch import logged  # noqa: F401 - the fixture


def test_score_runs_over_spark_connect(cli, connect_server, logged, tmp_path):  # noqa: F811
    table = tmp_path / "input.csv"
    pd.DataFrame(
        {"id": [1, 2, 3], "x": [0.1, 2.0, -1.0], "y": [1.0, 0.0, 2.5], "c": ["p", "q", "s"]}
    ).to_csv(table, index=False)
    proc = cli(
        "score",
        "--model",
        logged,
        "--input",
        str(table),
        "--output",
        str(tmp_path / "out"),
        "--key",
        "id",
        "--remote",
        connect_server.url,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 3 rows" in proc.stderr
    assert sorted(pd.read_parquet(tmp_path / "out")["id"]) == [1, 2, 3]


def test_a_connect_server_that_is_not_there_is_named_at_once(cli, tmp_path):
    started = time.monotonic()
    proc = cli(
        "run",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--remote",
        "sc://127.0.0.1:1",
        "--set",
        f"tracking.local_store={tmp_path / 'store'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr[-2000:]  # infrastructure: try again later
    assert "cannot reach the Spark Connect server sc://127.0.0.1:1" in proc.stderr
    assert time.monotonic() - started < 60
