"""Airflow DAG ``lepton_spark_daily``: the pipeline once a day, through spark-submit.

    SPARK_SUBMIT --master MASTER [ARGS] jobs/run_pipeline.py PIPELINE --run-key {{ ds }} [--set k=v]

The run date is the run key, so a retried, cleared or re-triggered task for a date that already
trained finds the finished MLflow run and exits 0 without training again (trigger the DAG with
``{"force": true}`` to train that date again). The task maps ``jobs/run_pipeline.py``'s exit codes
(:mod:`lepton_spark.errors`) to what Airflow should do: 0 success; 2 (bad config, data or shards)
fails at once, since a retry would fail the same way until someone fixes the input; anything else
(3 training failed, 4 infrastructure, 130 interrupted, spark-submit's own failures) is retried.

Settings come from the environment of the Airflow worker, read when the task runs:

    LEPTON_HOME          working directory, the repository (default: two folders above this file,
                         symlinks resolved, so a symlink in the dags folder works)
    LEPTON_SPARK_SUBMIT  spark-submit to run (default: spark-submit on PATH)
    LEPTON_SPARK_MASTER  --master (default: local[2])
    LEPTON_PIPELINE      pipeline YAML (default: LEPTON_HOME/pipelines/tabular_demo.yaml)
    LEPTON_SET           space-separated k=v overrides, each passed as --set k=v (shell quoting)
    LEPTON_SPARK_ARGS    more spark-submit options, before the script (shell quoting), e.g.
                         "--conf spark.sql.shuffle.partitions=8 --driver-memory 4g" or a cluster's
                         "--py-files dist/lepton_spark.zip"; they win over the pipeline's own
                         spark section, which fills in what they do not set

and, read when the DAG is parsed, ``LEPTON_RETRIES`` (default 2) and ``LEPTON_RETRY_DELAY``
(seconds, default 600). ``PYSPARK_PYTHON`` and ``PYSPARK_DRIVER_PYTHON`` default to the ``python``
beside spark-submit (a virtual environment's ``bin``), which has ``lepton_spark`` installed; without
them spark-submit would pick whatever ``python3`` is first on the worker's PATH.

Only light imports at the top: the DAG processor imports this file often, and spark-submit runs in
a subprocess, so nothing of Spark, torch or the project is imported here.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Param, dag, task

DAG_ID = "lepton_spark_daily"
# The run's date. Airflow 3 lets a manual run have no logical date, and then no ds (its templates
# are strict: a missing name fails the task): that run's key is the day it was triggered.
RUN_KEY = "{{ ds if ds is defined else dag_run.run_after | ds }}"
DEFAULT_HOME = Path(__file__).resolve().parents[2]
EXIT_OK = 0
EXIT_BAD_INPUT = 2
MEANINGS = {2: "bad input", 3: "training failed", 4: "infrastructure", 130: "interrupted"}
# How long spark-submit gets to shut down after SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 60

log = logging.getLogger(__name__)


def pipeline_command(
    run_key: str, environ: dict[str, str] | None = None, *, force: bool = False
) -> tuple[list[str], Path, dict[str, str]]:
    """The spark-submit command, its working directory and environment for one run key.

    A function of the environment, not module constants, so the worker's environment at run time
    counts (the DAG processor's may differ) and tests can check it without running anything.
    """
    import shlex
    import shutil

    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("LEPTON_HOME") or DEFAULT_HOME)
    submit = env.get("LEPTON_SPARK_SUBMIT") or "spark-submit"
    if os.sep in submit and not os.path.isabs(submit):
        submit = str(home / submit)  # relative to LEPTON_HOME, where it runs
    master = env.get("LEPTON_SPARK_MASTER") or "local[2]"
    pipeline = env.get("LEPTON_PIPELINE") or str(home / "pipelines" / "tabular_demo.yaml")
    command = [submit, "--master", master, *shlex.split(env.get("LEPTON_SPARK_ARGS", ""))]
    command += ["jobs/run_pipeline.py", pipeline, "--run-key", run_key]
    for override in shlex.split(env.get("LEPTON_SET", "")):
        command += ["--set", override]
    if force:
        command.append("--force")

    # spark-submit's launcher runs Python (to find SPARK_HOME) and so do the driver and executors:
    # the environment's own interpreter, not the first python3 on PATH.
    found = submit if os.sep in submit else shutil.which(submit, path=env.get("PATH"))
    if found:
        python = Path(found).parent / "python"
        if python.exists():
            env.setdefault("PYSPARK_PYTHON", str(python))
            env.setdefault("PYSPARK_DRIVER_PYTHON", str(python))
    return command, home, env


# Keys whose values stay out of the task log (as lepton_spark.redact does for MLflow).
SECRET_KEY = r"(secret|passw|pwd|token(?!i[sz])|credential|(access|account|private|api)[._-]?key)"


def masked(command: list[str]) -> list[str]:
    """``command`` with the values of secret-looking ``key=value`` arguments hidden."""
    import re

    pattern = re.compile(rf"^([^=]*{SECRET_KEY}[^=]*)=.*$", re.IGNORECASE)
    return [pattern.sub(r"\1=*********(redacted)", part) for part in command]


def run_spark_submit(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``command``, every output line into the task log; its exit code and last lines.

    spark-submit gets a process group of its own so that a task stopped by Airflow (SIGTERM, or
    its execution timeout) stops the JVM, the Python driver and the rank processes together,
    instead of leaving a Spark job running with no task to watch it.
    """
    import collections
    import contextlib
    import signal
    import subprocess
    import threading

    tail: collections.deque[str] = collections.deque(maxlen=200)
    log.info("running in %s: %s", cwd, " ".join(masked(command)))
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="backslashreplace",
        bufsize=1,
        start_new_session=True,
    )

    def stop(signum: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            log.warning("stopping spark-submit (process group %s) with signal %s", proc.pid, signum)
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.killpg(proc.pid, signum)

    # Airflow's task runner handles SIGTERM by calling on_kill(), which a TaskFlow task does not
    # have: pass the signal on to spark-submit, then let Airflow's handler do its part.
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum: int, frame: object) -> None:
            stop()
            if callable(previous):
                previous(signum, frame)

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("%s", line)
        code = proc.wait()
    except BaseException:  # timeout, task killed: never leave spark-submit behind
        stop()
        try:
            proc.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            stop(signal.SIGKILL)
            proc.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if proc.stdout is not None:
            proc.stdout.close()
    log.info("spark-submit exited with code %s", code)
    return code, list(tail)


def _error_lines(tail: list[str]) -> str:
    """The driver's ``error: ...`` message (with its indented detail lines), else the last lines."""
    for i in range(len(tail) - 1, -1, -1):
        if tail[i].startswith("error: "):
            detail = [tail[i]]
            for line in tail[i + 1 :]:
                if not line.startswith((" ", "\t")):
                    break
                detail.append(line)
            return "\n".join(detail)
    return "\n".join(tail[-5:])


@dag(
    dag_id=DAG_ID,
    description="lepton-spark pipeline once a day: Spark ETL, Arrow shards, Horovod, MLflow",
    schedule="@daily",
    start_date=datetime(2026, 11, 1, tzinfo=UTC),
    catchup=False,
    # Two runs at once would train two models on the same machine and shards.
    max_active_runs=1,
    default_args={
        "owner": "lepton-spark",
        "retries": int(os.environ.get("LEPTON_RETRIES", "2")),
        "retry_delay": timedelta(seconds=float(os.environ.get("LEPTON_RETRY_DELAY", "600"))),
    },
    params={"force": Param(False, type="boolean", description="train this date again")},
    tags=["lepton-spark"],
    doc_md=__doc__,
)
def lepton_spark_daily() -> None:
    """One task: the whole pipeline is one spark-submit, idempotent per date."""

    @task
    def run_pipeline(run_key: str, params: dict | None = None, ti: Any = None) -> None:
        """Run the pipeline for ``run_key`` and turn its exit code into succeed, fail or retry."""
        from airflow.sdk.exceptions import AirflowFailException

        # --force on the first try only: a retry resumes what the forced run checkpointed.
        first_try = ti is None or getattr(ti, "try_number", 1) <= 1
        force = bool((params or {}).get("force", False)) and first_try
        command, home, env = pipeline_command(run_key, force=force)
        if not (home / "jobs" / "run_pipeline.py").is_file():
            raise AirflowFailException(
                f"LEPTON_HOME={home} has no jobs/run_pipeline.py; set LEPTON_HOME to the repository"
            )
        try:
            code, tail = run_spark_submit(command, home, env)
        except (FileNotFoundError, PermissionError) as err:
            raise AirflowFailException(
                f"cannot run {command[0]!r} ({err}); set LEPTON_SPARK_SUBMIT"
            ) from err
        if code == EXIT_OK:
            return
        signum = -code if code < 0 else code - 128 if code > 128 else 0  # JVM or shell report
        meaning = MEANINGS.get(code) or (
            f"stopped by signal {signum}" if signum else "spark-submit failed"
        )
        message = f"jobs/run_pipeline.py exited with code {code} ({meaning}):\n{_error_lines(tail)}"
        if code == EXIT_BAD_INPUT:
            # Config, data or shards: the same input fails the same way, so no retry.
            raise AirflowFailException(f"not retried: {message}")
        # 3 training failed, 4 infrastructure, 130 interrupted, spark-submit itself: retry.
        raise RuntimeError(message)

    run_pipeline(run_key=RUN_KEY)


lepton_spark_daily()
