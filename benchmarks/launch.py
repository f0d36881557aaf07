"""Launch cost: an empty training function (start the engine, one allreduce, stop) on 2 ranks
through lepton-spark's barrier stage (the pipeline's, and ``distributed.run(fn)`` on it) and
through the peers' launchers, alternating, on
``local[2]``; and where the time of our launch goes (:func:`breakdown`). Shared by
``vs_torchdistributor`` and ``vs_horovod_run``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import median
from lepton_spark.cluster.stage import BarrierSettings, run_barrier


def run_fn(spark: Any, backend: str) -> float:
    """Seconds for ``lepton_spark.distributed.run`` to run the empty function on 2 ranks (the
    process group up before it starts, as a user's function finds it)."""
    from lepton_spark import distributed

    started = time.perf_counter()
    results = distributed.run(
        _empty_user_fn, backend, spark=spark, num_workers=2, backend=backend, return_all=True
    )
    assert results == [2.0, 2.0], results
    return time.perf_counter() - started


def _empty_user_fn(backend: str) -> float:
    """A user's function under ``run``: one allreduce (the engine is already up)."""
    import torch

    if backend == "horovod":
        import horovod.torch as hvd

        return float(hvd.allreduce(torch.ones(1), op=hvd.Sum)[0])
    import torch.distributed as dist

    value = torch.ones(1)
    dist.all_reduce(value)
    return float(value[0])


def ours(spark: Any, backend: str) -> float:
    """Seconds for lepton-spark's barrier stage to run the empty function on 2 ranks."""
    started = time.perf_counter()
    results = run_barrier(spark, _EmptyRank(backend), 2, settings=BarrierSettings(engine=backend))
    assert results == [2.0, 2.0], results
    return time.perf_counter() - started


class _EmptyRank:
    """The rank's side: the engine up, a one-tensor allreduce, the engine down."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, ctx: Any) -> float:
        import torch

        from lepton_spark.config import TrainConfig
        from lepton_spark.training.engines import start_engine

        engine = start_engine(TrainConfig(backend=self.backend))
        try:
            return float(engine.allreduce(torch.ones(1))[0])
        finally:
            engine.shutdown()


def alternate(
    rounds: int, sides: dict[str, Callable[[], float]]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each side ``rounds`` times, in turn; every time and the medians after the first (cold)."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            seconds[name].append(side())
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    warm = {name: median(values[1:] or values) for name, values in seconds.items()}
    return seconds, warm


class _TimedRank:
    """The empty rank, with the wall-clock time of each of its steps (seconds since the epoch:
    one machine, one clock)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, ctx: Any) -> dict[str, float]:
        entered = time.time()
        spawned = _started_at()
        import torch

        from lepton_spark.config import TrainConfig
        from lepton_spark.training.engines import start_engine

        imported = time.time()
        engine = start_engine(TrainConfig(backend=self.backend))
        up = time.time()
        total = float(engine.allreduce(torch.ones(1))[0])
        reduced = time.time()
        engine.shutdown()
        assert total == 2.0
        return {
            "spawned": spawned,
            "entered": entered,
            "imported": imported,
            "up": up,
            "reduced": reduced,
            "down": time.time(),
        }


def _started_at() -> float:
    """When this process started (was forked), on ``time.time()``'s clock: its start tick in
    ``/proc`` against ``CLOCK_BOOTTIME``. (psutil's ``create_time`` adds the boot time, which
    ``/proc/stat`` gives in whole seconds: up to a second off, more than a warm fork takes.)"""
    with open("/proc/self/stat") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def breakdown(spark: Any, backend: str) -> dict[str, float]:
    """Where one launch of the empty function goes, in seconds (rank 0's side; the slower rank
    for the child's own steps)."""
    submitted = time.time()
    ranks = run_barrier(spark, _TimedRank(backend), 2, settings=BarrierSettings(engine=backend))
    returned = time.time()
    first = min(r["spawned"] for r in ranks)

    def longest(start: str, end: str) -> float:
        return max(r[end] - r[start] for r in ranks)

    return {
        # check_slots, the channel's probe job, the stage's job and its Python workers, rank 0's
        # rendezvous server up, the allGather of its port, the child process forked
        "stage_to_child": first - submitted,
        "child_start_and_unpickle": longest("spawned", "entered"),  # python, rank_main, cloudpickle
        "import_torch_and_lepton": longest("entered", "imported"),
        "engine_start": longest("imported", "up"),  # the rendezvous: gloo's pairs connected
        "allreduce": longest("up", "reduced"),
        "engine_shutdown": longest("reduced", "down"),
        # the child's exit, its result read, rank 0's server stopped, the rows collected
        "down_to_driver": returned - max(r["down"] for r in ranks),
        "total": returned - submitted,
    }
