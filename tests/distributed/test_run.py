"""``lepton_spark.distributed.run(fn)``: a user's own loop on the ranks of a barrier stage, with
the loader, live MLflow metrics, checkpoints that survive kill -9, and errors named."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import mlflow
import pytest
from mlflow import MlflowClient

from lepton_spark import distributed
from lepton_spark.distributed.rank import RunSettings, UserCall, run_on_rank
from lepton_spark.errors import BarrierError, ConfigError, RankInputError, StallError
from lepton_spark.shards import materialize

# The ranks (a Connect server's workers) cannot import tests/: the functions travel by value,
# as a notebook's do.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _frame(spark, rows: int = 12_000):
    from pyspark.sql import functions as F

    df = spark.range(rows).select(
        (F.rand(1) * 2 - 1).alias("a"), (F.rand(2) * 2 - 1).alias("b"), F.col("id")
    )
    return df.withColumn("label", ((F.col("a") + F.col("b")) > 0).cast("int"))


def _train(shards, epochs: int, store: str, lr: float = 0.5) -> dict:
    """A user's DDP loop over the dealt shards; rank 0 checks its metric is in MLflow while
    the function still runs (it arrived live, not after the stage)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ctx = distributed.context()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rows, steps = 0, 0
    for epoch in range(epochs):
        batches = ctx.loader(shards, epoch, 256)
        for batch in batches:
            loss = torch.nn.functional.cross_entropy(model(batch.numeric), batch.label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rows += len(batch.label)
            steps += 1
            ctx.heartbeat()
        ctx.log_metrics({"train/loss": float(loss), "train/rows": float(rows)}, step=epoch + 1)
    right = torch.zeros(2)
    with torch.no_grad():
        for batch in ctx.loader(shards, split="validation", batch_size=1000):
            hits = float((model.module(batch.numeric).argmax(1) == batch.label).sum())
            right += torch.tensor([hits, float(len(batch.label))])
    torch.distributed.all_reduce(right)
    live = None
    if ctx.rank == 0:
        client = MlflowClient(store)
        deadline = time.monotonic() + 60
        while live is None and time.monotonic() < deadline:
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="attributes.run_name = '_train'",
            )
            found = runs and client.get_metric_history(runs[0].info.run_id, "train/rows")
            live = len(found) if found and len(found) == epochs else None
            time.sleep(0.5)
    return {
        "rank": ctx.rank,
        "size": ctx.size,
        "accuracy": float(right[0] / right[1]),
        "validated": int(right[1]),
        "rows": rows,
        "steps": steps,
        "live": live,
    }


@pytest.mark.connect
@pytest.mark.slow
def test_a_user_loop_trains_on_its_dealt_shards_and_its_metrics_reach_mlflow_live(spark, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    MlflowClient(store).search_experiments()  # the store's tables made here, not by two at once
    shards = materialize(
        _frame(spark), label="label", numeric=["a", "b"], root=str(tmp_path / "shards")
    )
    again = materialize(
        _frame(spark), label="label", numeric=["a", "b"], root=str(tmp_path / "shards")
    )
    assert again.reused and again.folder == shards.folder  # found by its fingerprint

    results = distributed.run(
        _train, shards, 2, store, spark=spark, num_workers=2, return_all=True, lr=0.5
    )

    train = shards.manifest.split("train")
    assert [r["rank"] for r in results] == [0, 1] and results[0]["size"] == 2
    steps = train.steps_per_epoch(2, 256)
    assert all(r["steps"] == 2 * steps and r["rows"] == 2 * steps * 256 for r in results)
    assert results[0]["accuracy"] > 0.95  # a separable problem, a linear model
    assert results[0]["validated"] == shards.manifest.split("validation").rows  # each row once
    assert results[0]["live"] == 2  # both epochs' metrics were in MLflow while fn ran
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("lepton-spark-run").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/rows")
    assert [(m.step, m.value) for m in history] == [
        (1, float(steps * 256)),
        (2, float(2 * steps * 256)),
    ]


def _resumable(epochs: int) -> tuple[int, list[int], list[float]]:
    """Saves after every epoch; rank 1 kills itself (SIGKILL) in epoch 2 of the first attempt."""
    import torch

    ctx = distributed.context()
    state = ctx.checkpoint.load()
    start = 0 if state is None else int(state["epoch"])
    weights = torch.zeros(4) if state is None else state["weights"]
    done = []
    for epoch in range(start, epochs):
        if epoch == 2 and ctx.attempt == 0 and ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 0 waits in the allreduce below
        weights = weights + ctx.engine.allreduce(torch.ones(4))
        ctx.checkpoint.save({"epoch": epoch + 1, "weights": weights})
        ctx.engine.allreduce(torch.ones(1))  # rank 0 saved before anyone moves on
        done.append(epoch)
        ctx.heartbeat(epoch)
    return ctx.attempt, done, [float(w) for w in weights]


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_resumes_from_the_functions_checkpoint(spark, tmp_path):
    attempt, done, weights = distributed.run(
        _resumable,
        4,
        spark=spark,
        num_workers=2,
        retries=1,
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert attempt == 1  # the second attempt finished
    assert done == [2, 3]  # epochs 0 and 1 were not run again
    assert weights == [8.0] * 4  # 4 epochs of an allreduce of ones over 2 ranks, once each
    assert (tmp_path / "ckpt" / "state.pt").is_file()


def _fails(rank: int) -> None:
    ctx = distributed.context()
    if ctx.rank == rank:
        raise ValueError(f"the labels of partition {rank} are negative")


def _bad_input() -> None:
    from lepton_spark.errors import DataError

    raise DataError("column x is missing")


@pytest.mark.slow
def test_the_functions_error_reaches_the_caller_naming_the_rank(spark, tmp_path):
    with pytest.raises(BarrierError) as err:
        distributed.run(_fails, 1, spark=spark, num_workers=2, backend="none")
    message = str(err.value)
    assert "rank 1 on" in message
    assert "ValueError: the labels of partition 1 are negative" in message
    # Bad input of the function's own is not retried (retries=2 would take 3 stages).
    started = time.monotonic()
    with pytest.raises(RankInputError, match="DataError: column x is missing"):
        distributed.run(_bad_input, spark=spark, num_workers=2, backend="none", retries=2)
    assert time.monotonic() - started < 60
    with pytest.raises(ConfigError, match="backend 'mpi'"):
        distributed.run(_fails, 0, spark=spark, backend="mpi")


def _stalls(shards) -> None:
    """Rank 1 reads 2 batches and hangs; rank 0 reads 3 and waits for it in an allreduce."""
    import torch

    ctx = distributed.context()
    for _ in zip(range(3 - ctx.rank), ctx.loader(shards, 0, 256), strict=False):
        pass
    if ctx.rank == 1:
        time.sleep(300)
    torch.distributed.all_reduce(torch.ones(1))


@pytest.mark.slow
def test_a_rank_that_stops_moving_is_named_and_the_stage_stopped(spark, tmp_path):
    shards = materialize(
        _frame(spark, 4_000),
        label="label",
        numeric=["a", "b"],
        num_workers=2,
        root=str(tmp_path / "shards"),
    )
    started = time.monotonic()
    with pytest.raises(StallError) as err:
        distributed.run(_stalls, shards, spark=spark, num_workers=2, stall_timeout_s=5)
    message = str(err.value)
    assert "rank 1 on" in message and "rank 0" not in message.split("stalled")[0], message
    assert "run(stall_timeout_s=)" in message and "epoch 1, training step 2" in message, message
    assert time.monotonic() - started < 120  # not the 300 s sleep, nor Gloo's 120 s timeout


def _one_rank() -> dict:
    import torch

    ctx = distributed.context()
    total = ctx.engine.allreduce(torch.ones(2))
    ctx.log_metrics({"x": 1.5}, step=3)
    ctx.checkpoint.save({"n": torch.tensor([7])})
    return {"rank": ctx.rank, "size": ctx.size, "sum": total.tolist(), "device": str(ctx.device)}


def test_the_rank_side_is_a_plain_function_and_context_is_only_set_inside(tmp_path: Path):
    with pytest.raises(RuntimeError, match="only available inside"):
        distributed.context()
    call = UserCall(_one_rank, (), {}, RunSettings(checkpoint_dir=str(tmp_path)))
    out = run_on_rank(call, rank=0, size=1)  # no Spark: one rank of one, a HashStore
    assert out.value == {"rank": 0, "size": 1, "sum": [1.0, 1.0], "device": "cpu"}
    assert out.reports[0]["metrics"] == {"x": 1.5} and out.reports[0]["step"] == 3
    import torch

    assert torch.load(tmp_path / "state.pt", weights_only=True)["n"].tolist() == [7]
    with pytest.raises(RuntimeError, match="only available inside"):
        distributed.context()


def _rank_value() -> int:
    return distributed.context().rank + 10


def test_only_the_values_run_returns_leave_their_ranks():
    quiet = UserCall(_rank_value, (), {}, RunSettings(backend="none"))
    every = UserCall(_rank_value, (), {}, RunSettings(backend="none", return_all=True))
    assert run_on_rank(quiet, rank=0, size=2).value == 10
    assert run_on_rank(quiet, rank=1, size=2).value is None  # dropped on rank 1
    assert run_on_rank(every, rank=1, size=2).value == 11
