"""Helpers shared by test modules: the CLI as a user runs it, and looking for stray processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRY = "lepton_spark.cluster.rank_main"
WARM_ENTRY = "lepton_spark.cluster.warm"  # its forked ranks keep the server's command line


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lepton-spark"), *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rank_processes() -> list[psutil.Process]:
    """Rank child processes (``python -m lepton_spark.cluster.rank_main``, or forked by the warm
    rank process ``python -m lepton_spark.cluster.warm``, whose command line and first
    environment they keep) alive on this machine that this test session started (its
    ``LEPTON_TEST_SESSION``, set by tests/conftest.py, is in their environment): another
    session's, running beside it, are not counted."""
    session = os.environ.get("LEPTON_TEST_SESSION")
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        cmdline = proc.info.get("cmdline") or []
        environ = proc.info.get("environ") or {}
        rank = ENTRY in cmdline or (WARM_ENTRY in cmdline and _forked_by_warm_server(proc))
        if rank and environ.get("LEPTON_TEST_SESSION") == session:
            found.append(proc)
    return found


def _forked_by_warm_server(proc: psutil.Process) -> bool:
    try:
        parent = proc.parent()
        return parent is not None and WARM_ENTRY in parent.cmdline()
    except psutil.Error:
        return False


def wait_until(condition, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def store_runs(store: Path, experiment: str) -> list:
    """All runs of ``experiment`` in the local store under ``store`` (none if it is not there)."""
    db = store / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []
