"""Faults during training: a rank killed mid-epoch, checkpoints that resume where training was."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import yaml
from mlflow import MlflowClient

from lepton_spark import events, run_pipeline
from lepton_spark.errors import (
    EXIT_INFRA,
    EXIT_INTERRUPTED,
    BarrierError,
    InputError,
    StallError,
    exit_code,
)
from tests.helpers import BIN, ROOT, cli_env, rank_processes, store_runs, wait_until


@pytest.mark.connect
@pytest.mark.slow
def test_a_killed_rank_is_retried_and_training_resumes_from_the_checkpoint(
    spark, demo_config, tmp_path, horovod
):
    base = {
        "train.epochs": 2,
        "train.checkpoint_every_steps": 20,
        "train.checkpoint_root": str(tmp_path / "checkpoints"),
    }
    clean = run_pipeline(demo_config.with_overrides(base), spark=spark, progress=lambda e: None)

    seen: list[events.Event] = []
    faulty = demo_config.with_overrides({**base, "train.fault_inject": "kill:1:50"})
    result = run_pipeline(faulty, spark=spark, progress=seen.append)

    starts = [e for e in seen if isinstance(e, events.Start)]
    assert [e.attempt for e in starts] == [0, 1]
    assert starts[1].resumed_from == (0, 40)  # the checkpoint at step 40, not step 0
    assert any(isinstance(e, events.Retry) for e in seen)
    assert any(isinstance(e, events.RankFailed) for e in seen)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["training.attempts"] == "2"
    # The same seed and the same batches from step 40 on: the same model as without the fault.
    assert result.metrics["val/accuracy"] == pytest.approx(clean.metrics["val/accuracy"], abs=0.005)
    assert np.isclose(result.metrics["val/loss"], clean.metrics["val/loss"], atol=0.005)
    assert len(result.history) == 2
    artifacts = {a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id)}
    assert "checkpoint" in artifacts


@pytest.mark.connect
@pytest.mark.slow
def test_a_rank_that_hangs_fails_the_stage_within_the_timeout_naming_it(
    spark, demo_config, tmp_path, horovod
):
    cfg = demo_config.with_overrides(
        {
            "train.fault_inject": "hang:1:30",
            "train.stall_timeout_s": 5,
            "train.retries": 0,
            "train.checkpoint_root": str(tmp_path / "checkpoints"),
        }
    )
    seen: list[tuple[float, events.Event]] = []
    with pytest.raises(StallError) as failed:
        run_pipeline(cfg, spark=spark, progress=lambda e: seen.append((time.monotonic(), e)))
    failed_at = time.monotonic()
    message = str(failed.value)
    assert re.match(r"rank 1 on \S+ stalled: no progress for \d+ s", message), message
    assert "training step 30" in message
    started = next(t for t, e in seen if isinstance(e, events.Start))
    # Step 30 comes within seconds of the start; then 5 s of stall, and the cancel (the hang
    # itself is forever: the margin is for a busy machine).
    assert failed_at - started < 5 + 40
    assert exit_code(failed.value) == EXIT_INFRA
    [run] = store_runs(tmp_path / "mlruns-data", cfg.name)
    assert run.info.status == "FAILED" and "rank 1" in run.data.tags["error"]
    assert wait_until(lambda: not rank_processes(), 60), rank_processes()


@pytest.mark.slow
def test_a_sigterm_to_the_driver_kills_the_run_and_leaves_no_process(tmp_path, horovod):
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [
                str(BIN / "lepton-spark"),
                "run",
                str(ROOT / "pipelines" / "tabular_demo.yaml"),
                "--master",
                "local[2]",
                "--set",
                "sources.events.generate.rows=200000",
                "--set",
                "train.epochs=30",
            ],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        # Mid-training: the first epoch is done and the ranks are running.
        assert wait_until(lambda: "epoch 1/30" in log.read_text(), 300), log.read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)  # JVM, workers, ranks
        assert len(rank_processes()) == 2 and len(family) >= 3
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted" in output and "epoch 30/30" not in output
    assert "retrying" not in output  # an interrupt is not a failure to retry
    print(f"SIGTERM → exit in {exited:.1f} s")
    assert exited < 60  # measured: 6 s; the run itself would go on for minutes
    [run] = store_runs(tmp_path / "mlruns-data", "tabular-demo")
    assert run.info.status == "KILLED"
    assert wait_until(lambda: not any(p.is_running() for p in family), 60), [
        p.cmdline() for p in family if p.is_running()
    ]
    assert not rank_processes()


@pytest.mark.slow
def test_a_run_key_resumes_an_unfinished_run_and_reuses_a_finished_one(
    spark, demo_config, tmp_path, cli, horovod
):
    checkpoints = tmp_path / "checkpoints"
    base = {
        "train.checkpoint_every_steps": 20,
        "train.checkpoint_root": str(checkpoints),
    }
    key = "2026-11-22"
    faulty = demo_config.with_overrides(
        {**base, "train.fault_inject": "kill:1:50", "train.retries": 0}
    )
    with pytest.raises(BarrierError, match="rank 1"):
        run_pipeline(faulty, spark=spark, progress=lambda e: None, run_key=key)
    [failed] = store_runs(tmp_path / "mlruns-data", demo_config.name)
    assert failed.info.status == "FAILED" and failed.data.tags["lepton.run_key"] == key
    assert (checkpoints / failed.info.run_id / "checkpoint.pt").is_file()

    cfg = demo_config.with_overrides(base)
    with pytest.raises(InputError, match="another pipeline config"):  # its checkpoint won't do
        run_pipeline(cfg.with_overrides({"train.epochs": 3}), spark=spark, run_key=key)
    seen: list[events.Event] = []
    resumed = run_pipeline(cfg, spark=spark, progress=seen.append, run_key=key)
    assert resumed.outcome == "resumed" and resumed.run_id == failed.info.run_id
    [start] = [e for e in seen if isinstance(e, events.Start)]
    assert start.resumed_from == (0, 40)
    run = MlflowClient(resumed.tracking_uri).get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    history = MlflowClient(resumed.tracking_uri).get_metric_history(resumed.run_id, "val/loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert not (checkpoints / resumed.run_id).exists()  # kept in MLflow, removed locally

    again: list[events.Event] = []
    reused = run_pipeline(cfg, spark=spark, progress=again.append, run_key=key)
    assert reused.outcome == "already_finished" and reused.run_id == resumed.run_id
    assert again == []  # no training
    assert reused.metrics["val/accuracy"] == pytest.approx(resumed.metrics["val/accuracy"])
    assert len(store_runs(tmp_path / "mlruns-data", demo_config.name)) == 1

    # From a scheduler: exit 0 and it says so, without starting Spark.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = cli("run", str(pipeline), "--run-key", key, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"run key {key}: finished already in MLflow run {resumed.run_id}" in proc.stderr

    fresh = run_pipeline(cfg, spark=spark, progress=lambda e: None, run_key=key, force=True)
    assert fresh.outcome == "trained" and fresh.run_id != resumed.run_id
