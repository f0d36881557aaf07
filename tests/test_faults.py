"""Faults during training: a rank killed mid-epoch, checkpoints that resume where training was."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import torch
import yaml
from helpers import BIN, ROOT, cli_env, rank_processes, run_cli, store_runs, wait_until
from mlflow import MlflowClient

from lepton_spark import run_pipeline
from lepton_spark.barrier import BarrierError, StallError
from lepton_spark.checkpoint import Checkpoint, Position, load_checkpoint, save_checkpoint
from lepton_spark.errors import EXIT_INFRA, EXIT_INTERRUPTED, InputError, exit_code
from lepton_spark.watchdog import (
    CHECKPOINT,
    EVALUATING,
    REDUCING,
    TRAINING,
    Heartbeat,
    RankState,
    StallWatch,
)


def test_a_checkpoint_round_trips_through_a_safe_load(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    schedule.step()
    history = [{"epoch": 1, "val_accuracy": 0.5}]
    save_checkpoint(
        tmp_path / "ck",
        Checkpoint(
            Position(1, 7, 42),
            model.state_dict(),
            optimizer.state_dict(),
            schedule.state_dict(),
            history,
        ),
    )
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["checkpoint.pt"]  # no temp left
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded is not None and loaded.position == Position(1, 7, 42)
    assert loaded.history == history
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model[name], value)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded.optimizer)
    torch.testing.assert_close(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert load_checkpoint(tmp_path / "none") is None


@pytest.mark.slow
def test_a_killed_rank_is_retried_and_training_resumes_from_the_checkpoint(
    spark, demo_config, tmp_path
):
    base = {
        "train.epochs": 2,
        "train.checkpoint_every_steps": 20,
        "train.checkpoint_root": str(tmp_path / "checkpoints"),
    }
    clean = run_pipeline(demo_config.with_overrides(base), spark=spark, progress=lambda e: None)

    events: list[dict] = []
    faulty = demo_config.with_overrides({**base, "train.fault_inject": "kill:1:50"})
    result = run_pipeline(faulty, spark=spark, progress=events.append)

    starts = [e for e in events if e["event"] == "start"]
    assert [e["attempt"] for e in starts] == [0, 1]
    assert starts[1]["resumed_from"] == [0, 40]  # the checkpoint at step 40, not step 0
    assert any(e["event"] == "retry" for e in events)
    assert any(e["event"] == "rank_failed" for e in events)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["training.attempts"] == "2"
    # The same seed and the same batches from step 40 on: the same model as without the fault.
    assert result.metrics["val_accuracy"] == pytest.approx(clean.metrics["val_accuracy"], abs=0.005)
    assert np.isclose(result.metrics["val_loss"], clean.metrics["val_loss"], atol=0.005)
    assert len(result.history) == 2
    artifacts = {a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id)}
    assert "checkpoint" in artifacts


def heartbeat(rank: int, epoch: int, step: int, doing: int = TRAINING) -> dict:
    return {
        "event": "heartbeat",
        "rank": rank,
        "host": f"host{rank}",
        "at": [epoch, step, doing, 0],
    }


def test_the_stall_watch_names_the_rank_furthest_behind():
    stalls: list[str] = []
    watch = StallWatch(3, timeout_s=10, startup_s=30, on_stall=stalls.append, poll_s=3600)
    try:
        t0 = time.monotonic()
        watch.observe(heartbeat(0, -1, 0))
        assert watch.check(t0 + 29) is None  # ranks may take the startup allowance
        assert "rank(s) 1, 2 did not start within 30 s" in watch.check(t0 + 31)
        watch.observe(heartbeat(1, -1, 0))
        watch.observe(heartbeat(2, -1, 0))
        for step in range(1, 51):
            for rank in (0, 1, 2):
                watch.observe(heartbeat(rank, 0, step))
        watch.observe(heartbeat(0, 0, 51))  # ranks 0 and 2 move on; rank 1 does not
        watch.observe(heartbeat(2, 0, 51))
        moved = time.monotonic()
        assert watch.check(moved + 9) is None
        message = watch.check(moved + 11)
        assert message is not None
        assert message.startswith("rank 1 on host1 stalled: no progress for 11 s")
        assert "at epoch 1, training step 50" in message
        assert "the other ranks wait for it" in message
        watch.observe(heartbeat(1, 0, 51))  # everyone at the same place: all are named
        assert "rank 0 on host0, rank 1 on host1, rank 2 on host2" in watch.check(
            time.monotonic() + 11
        )
    finally:
        watch.close()
    assert stalls == []  # the poll thread never ran: check() decides, on_stall only reports


def test_without_a_single_report_the_stall_watch_stays_quiet():
    """No heartbeat at all: the event channel is blocked, not every rank hung at once."""
    watch = StallWatch(2, timeout_s=10, startup_s=30, on_stall=lambda m: None, poll_s=3600)
    try:
        assert watch.check(time.monotonic() + 3600) is None
    finally:
        watch.close()


def test_a_rank_writing_a_checkpoint_is_behind_the_ranks_waiting_for_it():
    waiting = RankState(0, 21, TRAINING)
    writing = RankState(0, 20, CHECKPOINT)
    evaluating = RankState(0, 100, EVALUATING, 3)
    reducing = RankState(0, 100, REDUCING)
    assert writing < waiting < evaluating < reducing < RankState(1, 1, TRAINING)
    assert RankState().describe().startswith("at start-up")


def test_heartbeats_reach_the_driver_and_stop_when_closed():
    sent: list[dict] = []
    beat = Heartbeat(sent.append, rank=3, host="h", interval_s=0.05)
    beat.beat(0, 7)
    assert wait_until(lambda: any(e["at"] == [0, 7, TRAINING, 0] for e in sent), 5)
    beat.close()
    count = len(sent)
    beat.beat(0, 8)
    time.sleep(0.2)
    assert len(sent) == count and sent[0]["at"] == [-1, 0, TRAINING, 0]


@pytest.mark.slow
def test_a_rank_that_hangs_fails_the_stage_within_the_timeout_naming_it(
    spark, demo_config, tmp_path
):
    cfg = demo_config.with_overrides(
        {
            "train.fault_inject": "hang:1:30",
            "train.stall_timeout_s": 5,
            "train.retries": 0,
            "train.checkpoint_root": str(tmp_path / "checkpoints"),
        }
    )
    events: list[tuple[float, dict]] = []
    with pytest.raises(StallError) as failed:
        run_pipeline(cfg, spark=spark, progress=lambda e: events.append((time.monotonic(), e)))
    failed_at = time.monotonic()
    message = str(failed.value)
    assert re.match(r"rank 1 on \S+ stalled: no progress for \d+ s", message), message
    assert "training step 30" in message
    started = next(t for t, e in events if e["event"] == "start")
    # Step 30 comes within a second of the start; then 5 s of stall, and the cancel.
    assert failed_at - started < 5 + 10
    assert exit_code(failed.value) == EXIT_INFRA
    [run] = store_runs(tmp_path / "mlruns-data", cfg.name)
    assert run.info.status == "FAILED" and "rank 1" in run.data.tags["error"]
    assert wait_until(lambda: not rank_processes(), 15), rank_processes()


@pytest.mark.slow
def test_a_sigterm_to_the_driver_kills_the_run_and_leaves_no_process(tmp_path):
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
        proc.wait(timeout=60)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted" in output and "epoch 30/30" not in output
    assert "retrying" not in output  # an interrupt is not a failure to retry
    print(f"SIGTERM → exit in {exited:.1f} s")
    assert exited < 30
    [run] = store_runs(tmp_path / "mlruns-data", "tabular-demo")
    assert run.info.status == "KILLED"
    assert wait_until(lambda: not any(p.is_running() for p in family), 15), [
        p.cmdline() for p in family if p.is_running()
    ]
    assert not rank_processes()


@pytest.mark.slow
def test_a_run_key_resumes_an_unfinished_run_and_reuses_a_finished_one(
    spark, demo_config, tmp_path
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
    events: list[dict] = []
    resumed = run_pipeline(cfg, spark=spark, progress=events.append, run_key=key)
    assert resumed.outcome == "resumed" and resumed.run_id == failed.info.run_id
    [start] = [e for e in events if e["event"] == "start"]
    assert start["resumed_from"] == [0, 40]
    run = MlflowClient(resumed.tracking_uri).get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    history = MlflowClient(resumed.tracking_uri).get_metric_history(resumed.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert not (checkpoints / resumed.run_id).exists()  # kept in MLflow, removed locally

    again: list[dict] = []
    reused = run_pipeline(cfg, spark=spark, progress=again.append, run_key=key)
    assert reused.outcome == "already_finished" and reused.run_id == resumed.run_id
    assert again == []  # no training
    assert reused.metrics["val_accuracy"] == pytest.approx(resumed.metrics["val_accuracy"])
    assert len(store_runs(tmp_path / "mlruns-data", demo_config.name)) == 1

    # From a scheduler: exit 0 and it says so, without starting Spark.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = run_cli("run", str(pipeline), "--run-key", key, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"run key {key}: finished already in MLflow run {resumed.run_id}" in proc.stderr

    fresh = run_pipeline(cfg, spark=spark, progress=lambda e: None, run_key=key, force=True)
    assert fresh.outcome == "trained" and fresh.run_id != resumed.run_id
