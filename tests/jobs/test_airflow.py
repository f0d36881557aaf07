"""Scheduled runs: the lepton_spark_daily DAG in a real Airflow, and jobs/nightly.sh.

Airflow lives in .venv-airflow (its pins clash with the project's), made by
scripts/airflow_env.sh when missing, so these tests drive it as a user does: its CLI and its own
interpreter, with AIRFLOW_HOME (sqlite metadata DB, logs) under a temporary folder. The DAG runs the
real spark-submit of the project's .venv on a small pipeline; the MLflow store it writes is read
back here with the project's mlflow.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.helpers import BIN, ROOT, store_runs

DAG_ID = "lepton_spark_daily"
TASK_ID = "run_pipeline"
EXPERIMENT = "tabular-demo"  # the demo pipeline's name
AIRFLOW_VENV = ROOT / ".venv-airflow"
# The session options the project applies itself outside spark-submit
# (lepton_spark.data.session), given here: loopback only, no UI port, few shuffle partitions.
SPARK_ARGS = (
    "--conf spark.driver.host=127.0.0.1 --conf spark.driver.bindAddress=127.0.0.1 "
    "--conf spark.ui.enabled=false --conf spark.ui.showConsoleProgress=false "
    "--conf spark.sql.shuffle.partitions=4 --conf spark.sql.execution.arrow.pyspark.enabled=true"
)
# A master URL spark-submit rejects at once (exit 1): a real failure that is not bad input.
REJECTED_MASTER = "nosuchscheme://localhost"


def small_pipeline(tmp: Path) -> str:
    """LEPTON_SET for the demo pipeline shrunk to run in seconds, writing under ``tmp``."""
    return (
        f"sources.events.generate.rows=20000 train.epochs=1 "
        f"tracking.local_store={tmp}/mlruns-data shards.root={tmp}/shards "
        f"train.checkpoint_root={tmp}/ck"
    )


def base_env(**extra: str) -> dict[str, str]:
    """This environment without settings that would steer Airflow, MLflow or the DAG elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "LEPTON_")) and k != "MLFLOW_TRACKING_URI"
    }
    env.update(
        PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ in jobs/airflow
        SPARK_LOCAL_IP="127.0.0.1",
        LEPTON_SPARK_SUBMIT=str(BIN / "spark-submit"),
        LEPTON_SPARK_ARGS=SPARK_ARGS,
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def airflow_bin() -> Path:
    """.venv-airflow/bin, installed by scripts/airflow_env.sh if missing (instant otherwise)."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "airflow_env.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return AIRFLOW_VENV / "bin"


@pytest.fixture(scope="module")
def airflow(airflow_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An AIRFLOW_HOME with a migrated sqlite metadata DB and the repository's DAG folder."""
    home = tmp_path_factory.mktemp("airflow-home")
    env = base_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "jobs" / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        # A retry (asserted, or a flaky run's) comes after 1 s, not the DAG's 10 minutes.
        LEPTON_RETRY_DELAY="1",
    )
    done = subprocess.run(
        [str(airflow_bin / "airflow"), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield {"bin": airflow_bin, "home": home, "env": env}


def dags_test(airflow: dict, day: str, **env: str) -> subprocess.CompletedProcess:
    """``airflow dags test lepton_spark_daily DAY`` with the DAG's settings in ``env``."""
    return subprocess.run(
        [str(airflow["bin"] / "airflow"), "dags", "test", DAG_ID, day],
        env={**airflow["env"], **env},
        cwd=airflow["home"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def task_tries(airflow: dict, day: str) -> list[tuple[str, int]]:
    """(state, try_number) of the task for each DAG run of ``day`` in the metadata DB."""
    with sqlite3.connect(airflow["home"] / "airflow.db") as db:
        return db.execute(
            "SELECT ti.state, ti.try_number FROM task_instance ti JOIN dag_run dr"
            " ON ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id"
            " WHERE ti.dag_id = ? AND ti.task_id = ? AND date(dr.logical_date) = ?",
            (DAG_ID, TASK_ID, day),
        ).fetchall()


# What the Airflow interpreter prints about the DAG: parsed with Airflow's own DagBag, and the
# command the task would run for settings given as JSON (the DAG file's pipeline_command).
DAG_REPORT = """
import importlib.util, json, sys
from airflow.dag_processing.dagbag import DagBag

folder, settings = sys.argv[1], json.loads(sys.argv[2])
bag = DagBag(dag_folder=folder)
dag = bag.dags.get("lepton_spark_daily")
report = {"import_errors": bag.import_errors, "dag_ids": sorted(bag.dags)}
if dag is not None:
    task = dag.get_task("run_pipeline")
    report.update(
        schedule=str(dag.schedule), catchup=dag.catchup, max_active_runs=dag.max_active_runs,
        task_ids=[t.task_id for t in dag.tasks], retries=task.retries,
        retry_delay=task.retry_delay.total_seconds(), run_key=task.op_kwargs.get("run_key"),
    )
spec = importlib.util.spec_from_file_location("lepton_spark_dag", folder + "/lepton_spark_dag.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
commands = {}
for name, environ in settings.items():
    force = environ.pop("force", "") == "yes"
    command, home, env = module.pipeline_command("2026-11-22", environ, force=force)
    commands[name] = {"command": command, "home": str(home),
                      "pyspark_python": env.get("PYSPARK_PYTHON")}
report["commands"] = commands
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow  # the Airflow environment takes minutes to build on a fresh machine
def test_dag_loads_in_airflow(airflow: dict) -> None:
    """The DAG imports cleanly in the real Airflow, with the schedule, retries and task we meant."""
    submit = str(BIN / "spark-submit")
    settings = {
        "defaults": {"PATH": "/nonexistent"},
        "configured": {
            "LEPTON_SPARK_SUBMIT": submit,
            "LEPTON_SPARK_MASTER": "spark://head:7077",
            "LEPTON_SPARK_ARGS": "--driver-memory 4g",
            "LEPTON_PIPELINE": "pipelines/other.yaml",
            "LEPTON_SET": "train.epochs=1 'tracking.run_name=a b'",
            "force": "yes",  # the DAG run's params {"force": true}
        },
    }
    started = time.monotonic()
    done = subprocess.run(
        [
            str(airflow["bin"] / "python"),
            "-c",
            DAG_REPORT,
            str(ROOT / "jobs" / "airflow"),
            json.dumps(settings),
        ],
        env={k: v for k, v in airflow["env"].items() if not k.startswith("LEPTON_RETR")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))

    assert report["import_errors"] == {}
    assert report["dag_ids"] == [DAG_ID]
    assert report["schedule"] == "@daily"
    assert report["catchup"] is False
    assert report["max_active_runs"] == 1
    assert report["task_ids"] == [TASK_ID]
    assert report["retries"] == 2
    assert report["retry_delay"] == timedelta(minutes=10).total_seconds()
    assert report["run_key"].startswith("{{ ds if ds is defined")
    assert seconds < 60  # Airflow's own import is most of it; the DAG file imports nothing heavy

    defaults = report["commands"]["defaults"]
    assert defaults["home"] == str(ROOT)
    assert defaults["command"] == [
        "spark-submit",
        "--master",
        "local[2]",
        "jobs/run_pipeline.py",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--run-key",
        "2026-11-22",
    ]
    configured = report["commands"]["configured"]
    assert configured["command"] == [
        submit,
        "--master",
        "spark://head:7077",
        "--driver-memory",
        "4g",
        "jobs/run_pipeline.py",
        "pipelines/other.yaml",
        "--run-key",
        "2026-11-22",
        "--set",
        "train.epochs=1",
        "--set",
        "tracking.run_name=a b",
        "--force",
    ]
    # The interpreter beside spark-submit: the project's, where lepton_spark is installed.
    assert configured["pyspark_python"] == str(BIN / "python")


@pytest.mark.slow
def test_airflow_env_is_idempotent(airflow_bin: Path) -> None:
    """A second scripts/airflow_env.sh finds its stamp and returns at once, saying nothing."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "airflow_env.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == done.stderr == ""
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_dags_test_trains_once_per_date(
    airflow: dict, tmp_path: Path, horovod, starts_spark
) -> None:
    """A daily run trains and records the date as run key; the same date again trains nothing."""
    settings = {"LEPTON_SET": small_pipeline(tmp_path)}
    first = dags_test(airflow, "2026-11-22", **settings)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    runs = store_runs(tmp_path / "mlruns-data", EXPERIMENT)
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["lepton.run_key"] == "2026-11-22"
    assert task_tries(airflow, "2026-11-22") == [("success", 1)], first.stdout[-20000:]

    again = dags_test(airflow, "2026-11-22", **settings)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    assert "finished already" in again.stdout + again.stderr
    runs = store_runs(tmp_path / "mlruns-data", EXPERIMENT)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(runs[0].info.run_id, "FINISHED")]


@pytest.mark.slow
def test_bad_input_fails_without_retry(airflow: dict, tmp_path: Path, starts_spark) -> None:
    """Exit code 2 fails the task on its first try: a retry would fail the same way."""
    # The retry delay is 1 s: were exit 2 retried, the run would show 3 tries.
    done = dags_test(airflow, "2026-11-21", LEPTON_SET=f"{small_pipeline(tmp_path)} train.epochs=0")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "DagRun failed" in output
    assert "not retried: jobs/run_pipeline.py exited with code 2 (bad input)" in output
    assert "train.epochs: Input should be greater than 0" in output
    assert output.count(f"[DAG TEST] starting task_id={TASK_ID}") == 1
    assert task_tries(airflow, "2026-11-21") == [("failed", 1)]
    assert store_runs(tmp_path / "mlruns-data", EXPERIMENT) == []


@pytest.mark.slow
def test_other_failures_are_retried(airflow: dict, starts_spark) -> None:
    """Any other exit code (here spark-submit's own, for a master URL it rejects) is retried."""
    done = dags_test(
        airflow,
        "2026-11-20",
        LEPTON_SPARK_MASTER=REJECTED_MASTER,
        LEPTON_RETRIES="1",
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "DagRun failed" in output
    assert "exited with code 1 (spark-submit failed)" in output
    assert "bad input" not in output
    assert output.count(f"[DAG TEST] starting task_id={TASK_ID}") == 2
    assert task_tries(airflow, "2026-11-20") == [("failed", 2)]


def nightly(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """jobs/nightly.sh as cron runs it, and the log file it wrote."""
    logs = tmp_path / "logs"
    done = subprocess.run(
        ["bash", str(ROOT / "jobs" / "nightly.sh"), *args],
        env=base_env(LEPTON_LOG_DIR=str(logs), **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (log,) = logs.glob(f"nightly-{args[0] if args else ''}*.log")
    return done, log.read_text()


@pytest.mark.slow
def test_nightly_bad_input_exits_2_without_retry(tmp_path: Path, starts_spark) -> None:
    done, log = nightly(
        tmp_path,
        "2026-11-22",
        LEPTON_SET=f"{small_pipeline(tmp_path)} train.epochs=0",
        LEPTON_RETRY_DELAY="1",
    )
    assert done.returncode == 2, log
    assert "attempt 1/3" in log
    assert "attempt 2/3" not in log
    assert "train.epochs: Input should be greater than 0" in done.stderr
    assert "--run-key 2026-11-22" in log


@pytest.mark.slow
def test_nightly_retries_other_failures(tmp_path: Path, starts_spark) -> None:
    done, log = nightly(
        tmp_path,
        "2026-11-20",
        LEPTON_SPARK_MASTER=REJECTED_MASTER,
        LEPTON_RETRIES="1",
        LEPTON_RETRY_DELAY="1",
    )
    assert done.returncode == 1, log
    assert "attempt 2/2: exit code 1" in log
    assert "retrying in 1s" in log
