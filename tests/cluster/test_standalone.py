"""The pipeline on a real Spark standalone cluster (a master and 2 workers of 1 core on 127.0.0.1),
submitted with spark-submit exactly as the README shows, with lepton_spark shipped as a wheel;
then the same with Spark's authentication and encryption switched on."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lepton_spark.cluster.standalone import StandaloneCluster
from tests.helpers import ROOT, cli_env, run_cli, wait_until

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SMALL = [
    "--set",
    "sources.events.generate.rows=60000",
    "--set",
    "train.epochs=2",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``make wheel``'s commands: the wheel spark-submit ships with --py-files, as a .zip."""
    out = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    [built] = out.glob("lepton_spark-*.whl")
    shipped = out / "lepton_spark.zip"  # Spark adds .zip (not .whl) files to sys.path
    shipped.write_bytes(built.read_bytes())
    return shipped


def submit(
    master: str, wheel: Path, work: Path, *args: str, properties: Path | None = None, env=None
) -> subprocess.CompletedProcess:
    command, environment = submit_command(
        master, wheel, work, *args, properties=properties, env=env
    )
    return subprocess.run(
        command, cwd=work, env=environment, capture_output=True, text=True, timeout=600
    )


def submit_command(
    master: str, wheel: Path, work: Path, *args: str, properties: Path | None = None, env=None
) -> tuple[list[str], dict[str, str]]:
    """The spark-submit command line of the demo job, and its environment."""
    command = [
        str(BIN / "spark-submit"),
        "--master",
        master,
        "--py-files",
        str(wheel),
        "--conf",
        f"spark.pyspark.python={sys.executable}",
        "--conf",
        f"spark.pyspark.driver.python={sys.executable}",
        "--conf",
        "spark.executor.cores=1",
        "--conf",
        "spark.driver.host=127.0.0.1",
    ]
    if properties is not None:
        command += ["--properties-file", str(properties)]
    command += [
        str(ROOT / "jobs" / "run_pipeline.py"),
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        *SMALL,
        "--set",
        f"tracking.local_store={work / 'mlruns-data'}",
        "--set",
        f"shards.root={work / 'shards'}",
        "--set",
        f"train.checkpoint_root={work / 'checkpoints'}",
        *args,
    ]
    environment = {**cli_env(), "PATH": f"{BIN}:{cli_env().get('PATH', '')}", **(env or {})}
    return command, environment


def first_refusal(master: str, work: Path, timeout_s: float = 180.0) -> str:
    """Submit without the cluster's secret; return the driver's first line saying the master
    refused it, then end the driver (or fail after ``timeout_s`` with what it printed)."""
    work.mkdir()
    command = [
        str(BIN / "spark-submit"),
        "--master",
        master,
        "--conf",
        "spark.driver.host=127.0.0.1",
    ]
    command += [
        str(ROOT / "jobs" / "run_pipeline.py"),
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
    ]
    env = {**cli_env(), "PATH": f"{BIN}:{cli_env().get('PATH', '')}"}
    proc = subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(timeout_s, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    printed: list[str] = []
    try:
        for line in proc.stderr:
            printed.append(line)
            if "SaslMessage" in line:  # "Expected SaslMessage, received something else"
                return line.strip()
        raise AssertionError("the driver was not refused:\n" + "".join(printed[-40:]))
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def finished_run(work: Path):
    client = MlflowClient(f"sqlite:///{work / 'mlruns-data' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tabular-demo").experiment_id])
    assert run.info.status == "FINISHED"
    return client, run


@pytest.fixture()
def cluster(tmp_path) -> Iterator[StandaloneCluster]:
    """What `lepton-spark cluster up` starts: 2 workers of 1 core, with a secret."""
    with StandaloneCluster(
        folder=tmp_path / "cluster", workers=2, cores_per_worker=1, secret=secrets.token_hex(32)
    ) as c:
        c.write_properties()
        yield c


def test_the_pipeline_runs_on_a_two_worker_cluster_via_spark_submit(
    cluster, wheel, tmp_path, horovod, starts_spark
):
    started = time.monotonic()
    properties = cluster.folder / "spark-secure.conf"
    proc = submit(
        cluster.master_url, wheel, tmp_path, "--run-key", "2026-11-22", properties=properties
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"cluster run: {time.monotonic() - started:.1f} s")
    client, run = finished_run(tmp_path)
    assert run.data.tags["lepton.run_key"] == "2026-11-22"
    assert float(run.data.metrics["val/accuracy"]) > 0.75
    # The ranks ran the shipped wheel, not an installed copy.
    assert "lepton_spark.zip" in run.data.tags["ranks.code"], run.data.tags["ranks.code"]
    # One executor per worker (1 core each): the two ranks ran in separate executors.
    for worker in (0, 1):
        executors = list((cluster.folder / f"worker-{worker}").glob("app-*/*/stderr"))
        assert executors, f"worker {worker} ran no executor"
    # Rendezvous on the executor's own address, never on all interfaces.
    printed = proc.stdout + proc.stderr
    assert "Horovod rendezvous server at 127.0.0.1:" in printed
    assert "rendezvous server at 0.0.0.0" not in printed

    again = submit(
        cluster.master_url, wheel, tmp_path, "--run-key", "2026-11-22", properties=properties
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished already" in again.stdout
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_the_pipeline_runs_unchanged_with_authentication_and_encryption(
    tmp_path, wheel, horovod, starts_spark
):
    env_secret = "env-" + secrets.token_hex(12)
    conf_secret = "conf-" + secrets.token_hex(12)
    folder = tmp_path / "cluster"
    # `lepton-spark cluster up` as a user runs it: a generated secret, authentication and
    # encryption on, the properties to join with in a file only this user reads.
    up = run_cli("cluster", "up", "--folder", str(folder), cwd=tmp_path, timeout=180)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "authentication and encryption on" in up.stderr + up.stdout
    master_url = up.stdout.strip().splitlines()[-1]
    properties = folder / "spark-secure.conf"
    assert stat.S_IMODE(properties.stat().st_mode) == 0o600
    conf = dict(line.split(" ", 1) for line in properties.read_text().splitlines())
    secret = conf["spark.authenticate.secret"]
    assert len(secret) == 64 and conf["spark.network.crypto.enabled"] == "true"
    assert secret not in up.stdout + up.stderr
    try:
        # Without the secret the master turns the application away at its first knock (the
        # driver would go on knocking for a minute more before giving up: not waited for).
        started = time.monotonic()
        turned_away = first_refusal(master_url, tmp_path / "refused")
        print(f"refused in {time.monotonic() - started:.1f} s: {turned_away}")
        assert "SASL" in turned_away

        proc = submit(
            master_url,
            wheel,
            tmp_path,
            "--set",
            f"spark.conf.spark.hadoop.fs.s3a.secret.key={conf_secret}",
            properties=properties,
            env={"AWS_SECRET_ACCESS_KEY": env_secret, "MLFLOW_TRACKING_TOKEN": env_secret},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        client, run = finished_run(tmp_path)
        assert float(run.data.metrics["val/accuracy"]) > 0.75
        # No secret in the run's params, tags or text artifacts, nor in what was printed.
        seen = [proc.stdout, proc.stderr, str(run.data.params), str(run.data.tags)]
        for name in ("config.yaml", "manifest.json", "skew_report.json", "history.json"):
            seen.append(
                Path(client.download_artifacts(run.info.run_id, name, tmp_path)).read_text()
            )
        # ... nor in the shard manifests on disk, which only this user may read.
        manifests = list((tmp_path / "shards").rglob("manifest.json"))
        assert manifests
        for manifest in manifests:
            seen.append(manifest.read_text())
            assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
        for text in seen:
            for value in (secret, env_secret, conf_secret):
                assert value not in text
        assert run.data.params["spark.conf.spark.hadoop.fs.s3a.secret.key"].endswith("(redacted)")
    finally:
        down = run_cli("cluster", "down", "--folder", str(folder), cwd=tmp_path, timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]


def test_a_worker_lost_for_good_is_an_elastic_resume_on_the_ranks_left(
    tmp_path, wheel, starts_spark
):
    """2 FSDP ranks on 2 workers; one worker (its executor and rank with it) is killed for good
    after a checkpoint: the retry waits for its slot, finds one slot left, and with
    ``train.min_workers=1`` goes on from the 2 ranks' checkpoint on 1 rank to the end."""
    with StandaloneCluster(folder=tmp_path / "cluster", workers=2, cores_per_worker=1) as cluster:
        command, env = submit_command(
            cluster.master_url,
            wheel,
            tmp_path,
            *("--set", "train.backend=fsdp", "--set", "train.min_workers=1"),
            *("--set", "train.checkpoint_every_steps=20", "--set", "train.gloo_timeout_s=15"),
            *("--set", "train.stall_timeout_s=30", "--set", "train.retries=1"),
        )
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            written = wait_until(
                lambda: any((tmp_path / "checkpoints").glob("*/checkpoint.pt")), timeout=300
            )
            assert written, "no checkpoint was written"
            os.killpg(cluster.pids[2], signal.SIGKILL)  # worker-1: its group holds its executor
            printed, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = printed.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "going on with 1 ranks from the checkpoint" in text
    client, run = finished_run(tmp_path)
    assert run.data.tags["training.attempts"] == "2"
    assert run.data.tags["training.ranks"] == "2,1"
    ranks = client.get_metric_history(run.info.run_id, "train/ranks")
    assert sorted((m.step, m.value) for m in ranks) == [(0, 2.0), (1, 1.0)]
    assert float(run.data.metrics["val/accuracy"]) > 0.75
    losses = [
        m.value
        for m in sorted(
            client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step
        )
    ]
    assert len(losses) == 2 and losses[1] < losses[0]  # on 1 rank, on from the 2 ranks' state
