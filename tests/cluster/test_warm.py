"""The warm rank process (``lepton_spark.cluster.warm``): ranks forked from a server that has
torch imported, and the risks of forking after import checked on the real thing: CUDA never
initialised in the server, one thread in it, thread pools started in the child after the fork,
no secret of an earlier rank left for a later one, fresh random state, a dead server replaced,
and the switch that turns it off. The task's side alone: no Spark."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from lepton_spark.cluster import warm
from lepton_spark.cluster.child import run_child
from lepton_spark.cluster.task import RankContext
from lepton_spark.cluster.topology import Slot

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CONTEXT = RankContext(slot=Slot(0, 1, 0, 1, 0, 1, "127.0.0.1"))

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux")


def folder() -> Path:
    return warm.server_folder(warm.executor_pid())  # this test process's "executor"


@pytest.fixture(autouse=True)
def no_server_left():
    warm.stop_server(folder())
    yield
    warm.stop_server(folder())


def run(fn, env=None, warm_ranks=True):
    return cloudpickle.loads(
        run_child(cloudpickle.dumps(fn), CONTEXT, env or {}, None, warm_ranks)
    )[1]


def where_am_i(ctx):
    import numpy as np
    import torch

    before = len(os.listdir("/proc/self/task"))
    torch.set_num_threads(2)
    torch.randn(512, 512) @ torch.randn(512, 512)  # the intra-op pool starts here, after fork
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "torch_already_imported_at_fork": "torch" in sys.modules,
        "cuda_initialised": torch.cuda.is_initialized(),
        "threads_before_work": before,
        "torch_threads": torch.get_num_threads(),
        "env": dict(os.environ),
        "random": float(np.random.random()),
    }


def test_ranks_are_forked_from_one_server_that_holds_one_thread_and_no_cuda():
    first = run(where_am_i, {"LEPTON_TEST_VAR": "one"})
    second = run(where_am_i, {"LEPTON_TEST_VAR": "two"})
    server = warm.server_pid(folder())
    assert server is not None
    assert first["parent"] == second["parent"] == server  # forked by it, not started by us
    assert first["pid"] != second["pid"]
    assert not first["cuda_initialised"] and not second["cuda_initialised"]
    assert first["torch_threads"] == 2
    # The server itself: still one thread after forking ranks, and no CUDA library loaded.
    assert len(os.listdir(f"/proc/{server}/task")) == 1
    assert "libcuda" not in Path(f"/proc/{server}/maps").read_text()
    # Each child's environment is its own request's, nothing of the other's.
    assert first["env"]["LEPTON_TEST_VAR"] == "one" and second["env"]["LEPTON_TEST_VAR"] == "two"
    # numpy's global generator is reseeded in each child, as in a fresh interpreter.
    assert first["random"] != second["random"]


def scan_own_memory(ctx):
    """Whether each secret is anywhere in this process's writable memory (heap, stack, anonymous
    maps). A secret is given as two halves (``NAME_A``, ``NAME_B``) and matched as the first
    followed by the second, so that looking for it does not put it in memory whole."""
    halves = {
        n: (os.environ[n + "_A"].encode(), os.environ[n + "_B"].encode())
        for n in ("EARLIER", "MINE")
    }
    found = dict.fromkeys(halves, False)
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            span, perms, path = fields[0], fields[1], (fields[5] if len(fields) > 5 else "")
            if not perms.startswith("rw") or (path and path not in ("[heap]", "[stack]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for name, (a, b) in halves.items():
                at = chunk.find(a)
                while at >= 0 and not found[name]:
                    found[name] = chunk[at + len(a) : at + len(a) + len(b)] == b
                    at = chunk.find(a, at + 1)
    return found


def test_a_later_rank_inherits_no_secret_of_an_earlier_one():
    earlier = "s3cr3t-" + os.urandom(12).hex()
    assert run(where_am_i, {"STAGE_SECRET": earlier})["env"]["STAGE_SECRET"] == earlier
    mine = "m1ne-" + os.urandom(12).hex()
    env = {"STAGE_SECRET": mine}  # this rank's own secret, whole in its environment
    for name, value in (("EARLIER", earlier), ("MINE", mine)):
        env[name + "_A"], env[name + "_B"] = value[:14], value[14:]
    found = run(scan_own_memory, env)
    assert found["MINE"]  # the scan does find what this rank was given
    assert not found["EARLIER"]  # and nothing of the earlier rank's request


def test_a_server_that_dies_is_replaced():
    first = run(where_am_i)["parent"]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while warm.server_pid(folder()) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run(where_am_i)["parent"]
    assert second != first and second == warm.server_pid(folder())


def test_the_switch_off_starts_a_fresh_interpreter():
    fresh = run(where_am_i, warm_ranks=False)
    assert fresh["parent"] == os.getpid()  # our own child, no server involved
    assert warm.server_pid(folder()) is None


def killed(ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_warm_rank_is_told_as_killed():
    from lepton_spark.errors import BarrierError

    with pytest.raises(BarrierError, match="SIGKILL"):
        run(killed)
