"""Launch cost: an empty training function (start the engine, one allreduce, stop) on 2 ranks
through lepton-spark's barrier stage and through the peers' launchers, alternating, on
``local[2]``. Shared by ``vs_torchdistributor`` and ``vs_horovod_run``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmarks._common import median
from lepton_spark.cluster.stage import BarrierSettings, run_barrier


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
