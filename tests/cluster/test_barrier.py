"""The barrier stage with real Spark (local[2]) and real Horovod ranks."""

from __future__ import annotations

import socket
import sys
import time

import cloudpickle
import pytest

from lepton_spark.cluster.slots import slot_problem
from lepton_spark.cluster.stage import run_barrier
from lepton_spark.cluster.topology import slot_plan
from lepton_spark.errors import BarrierError, SlotsError
from lepton_spark.events import Epoch, Rendezvous

# Rank functions below are shipped to the rank processes by value (this module is not importable
# there).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def allreduce_rank_values(ctx):
    import horovod.torch as hvd
    import torch

    hvd.init()
    try:
        total = hvd.allreduce(torch.tensor([10.0 * (ctx.rank + 1)]), op=hvd.Sum)
        if ctx.report:
            ctx.report(Epoch(epoch=1, metrics={"rank": float(hvd.rank())}))
        return {
            "rank": hvd.rank(),
            "size": hvd.size(),
            "sum": float(total),
            "local_size": hvd.local_size(),
        }
    finally:
        hvd.shutdown()


def rank_one_fails(ctx):
    import horovod.torch as hvd

    hvd.init()
    if ctx.rank == 1:
        raise ValueError("the data on rank one is bad")
    time.sleep(600)  # rank 0 waits; Spark must tear it down when rank 1 fails


def test_slot_plan_counts_local_and_cross_ranks_per_host():
    plan = slot_plan(["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2", "10.0.0.1"])
    assert [(s.local_rank, s.local_size) for s in plan] == [(0, 3), (0, 2), (1, 3), (1, 2), (2, 3)]
    assert [(s.cross_rank, s.cross_size) for s in plan] == [(0, 2), (1, 2), (0, 2), (1, 2), (0, 1)]
    assert {s.size for s in plan} == {5}


def test_two_ranks_allreduce_to_the_right_sum(spark, horovod):
    events = []
    results = run_barrier(spark, allreduce_rank_values, 2, on_event=events.append)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["size"] == 2 and r["local_size"] == 2 for r in results)
    assert [r["sum"] for r in results] == [30.0, 30.0]
    assert sorted(e.metrics["rank"] for e in events if isinstance(e, Epoch)) == [0, 1]


def test_a_failing_rank_fails_the_stage_with_its_message_and_the_server_goes(spark, horovod):
    events = []
    started = time.monotonic()
    with pytest.raises(BarrierError) as err:
        run_barrier(spark, rank_one_fails, 2, on_event=events.append)
    assert "rank 1" in str(err.value)
    assert "ValueError: the data on rank one is bad" in str(err.value)
    # Far less than rank 0's sleep, however slow the machine is at starting the ranks.
    assert time.monotonic() - started < 300, "rank 0 was not torn down with the stage"

    [rendezvous] = [e for e in events if isinstance(e, Rendezvous)]
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((rendezvous.host, rendezvous.port), timeout=1):
                pass
        except OSError:
            break  # refused: the rendezvous server is gone
        assert time.monotonic() < deadline, "the rendezvous server outlived the failed stage"
        time.sleep(0.5)


def test_too_many_ranks_fail_at_once_with_what_is_there(spark):
    started = time.monotonic()
    with pytest.raises(SlotsError, match=r"num_workers=3 .* has 2"):
        run_barrier(spark, allreduce_rank_values, 3)
    assert time.monotonic() - started < 30  # no waiting for slots (Spark's own check: minutes)


def test_the_stage_runs_again_after_a_failure(spark, horovod):
    """No state leaks from one stage (or a failed one) into the next."""
    assert [r["sum"] for r in run_barrier(spark, allreduce_rank_values, 2)] == [30.0, 30.0]


def test_slot_checks_say_what_is_there_and_what_was_asked():
    assert slot_problem(2, 2, "auto", 0.0, "local[2]") is None
    assert slot_problem(1, 4, "cuda", 1.0, "spark://m:7077") is None
    few = slot_problem(4, 2, "auto", 0.0, "spark://m:7077")
    assert few is not None and "train.num_workers=4" in few and "(spark://m:7077) has 2" in few
    gpus = slot_problem(4, 2, "cuda", 1.0, "spark://m:7077")
    assert gpus is not None and "task slots with GPUs" in gpus and "add executors/GPUs" in gpus
    none = slot_problem(1, 8, "cuda", 0.0, "spark://m:7077")
    assert none is not None and "spark.task.resource.gpu.amount" in none
    # Local mode: the ranks share the machine's GPUs; Spark assigns none.
    assert slot_problem(2, 8, "cuda", 0.0, "local[8]", local_gpus=1) is None
    no_gpu = slot_problem(2, 8, "cuda", 0.0, "local[8]", local_gpus=0)
    assert no_gpu is not None and "no CUDA device" in no_gpu


def test_the_event_channel_is_probed_from_an_executor_before_the_ranks_start(spark):
    from lepton_spark.cluster.channel import EventServer
    from lepton_spark.cluster.stage import _probe_channel

    with EventServer("127.0.0.1", lambda e: None) as server:
        assert _probe_channel(spark, server.address) is None
    # A port bound here and never listened on: refused, and no other process can take it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        closed = _probe_channel(spark, f"127.0.0.1:{held.getsockname()[1]}:token")
    assert closed is not None and "Connection refused" in closed
