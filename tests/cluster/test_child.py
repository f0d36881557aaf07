"""One rank, one child process: its result back whole, and a rank that stops moving stopped by its
own task (no driver, no Spark: the task's side alone)."""

from __future__ import annotations

import sys
import time

import cloudpickle
import pytest

from lepton_spark.cluster.child import Watch, run_child
from lepton_spark.cluster.task import RankContext
from lepton_spark.cluster.topology import Slot
from lepton_spark.errors import BarrierError, StallError
from lepton_spark.events import Heartbeat

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CONTEXT = RankContext(slot=Slot(0, 1, 0, 1, 0, 1, "127.0.0.1"))


def beats_then_hangs(ctx):
    for step in range(1, 4):
        ctx.report(Heartbeat(rank=0, host="127.0.0.1", epoch=0, step=step))
        time.sleep(0.2)
    time.sleep(600)


def answers(ctx):
    ctx.report(Heartbeat(rank=0, host="127.0.0.1", epoch=0, step=1))
    return {"rank": ctx.rank, "big": b"x" * 100_000}


def fails(ctx):
    raise ValueError("bad rows on rank 0")


def run(fn, watch=None, warm=False):
    return cloudpickle.loads(run_child(cloudpickle.dumps(fn), CONTEXT, {}, watch, warm))


# Each holds for a fresh interpreter and for a child forked by the warm rank process.
fresh_or_warm = pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])


@pytest.fixture(scope="module", autouse=True)
def no_warm_server_left():
    yield
    from lepton_spark.cluster import warm

    warm.stop_server(warm.server_folder(warm.executor_pid()))


@fresh_or_warm
def test_the_child_s_result_comes_back_whole(warm):
    rank, result = run(answers, Watch(stall_timeout_s=120, startup_s=120), warm)
    assert rank == 0 and result == {"rank": 0, "big": b"x" * 100_000}


@fresh_or_warm
def test_a_child_that_stops_moving_is_stopped_by_its_own_task(warm):
    started = time.monotonic()
    with pytest.raises(StallError) as stopped:
        run(beats_then_hangs, Watch(stall_timeout_s=2, startup_s=60), warm)
    assert time.monotonic() - started < 120  # the hang is 600 s: the watch stopped it
    message = str(stopped.value)
    assert message.startswith("rank 0 on 127.0.0.1 stalled: no progress for")
    assert "at epoch 1, training step 3" in message and "stopped by its own task" in message


@fresh_or_warm
def test_a_failing_child_names_its_error(warm):
    with pytest.raises(BarrierError, match=r"rank 0 on 127\.0\.0\.1 failed: ValueError: bad rows"):
        run(fails, warm=warm)
