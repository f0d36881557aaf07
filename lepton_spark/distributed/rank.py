"""Each rank's side of ``lepton_spark.distributed.run``: the engine up, ``fn`` called, the engine
down. No Spark, no MLflow.

:class:`UserCall` is what the barrier task runs in the rank's child process
(:mod:`lepton_spark.cluster.rank_main`): it starts the engine the stage was set up for
(``ddp``/``fsdp``: ``torch.distributed.init_process_group`` on the stage's guarded store, so
the user's function must not call it; ``horovod``: ``hvd.init()``; ``none``: nothing, the
environment only), bounds torch's threads to the task's CPUs, sets :func:`context`, runs
``fn(*args, **kwargs)`` and returns :class:`RankOutput`: the function's value and rank 0's
metrics (logged by the driver after the stage when they did not arrive live).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lepton_spark.config import TrainConfig
from lepton_spark.distributed.rank_context import Checkpoints, Context, set_current
from lepton_spark.events import Event
from lepton_spark.training.devices import choose_device, threads
from lepton_spark.training.engines import start_engine
from lepton_spark.training.heartbeat import HeartbeatSender
from lepton_spark.training.worker import tell_rendezvous_ready

BACKENDS = ("ddp", "fsdp", "horovod", "none")


@dataclass(frozen=True)
class RunSettings:
    """What every rank of one attempt is told (picklable: it travels with the function)."""

    backend: str = "ddp"
    device: str = "auto"  # "auto", "cpu", "cuda"
    checkpoint_dir: str | None = None
    gloo_timeout_s: int = 120
    stall_timeout_s: float | None = None
    attempt: int = 0
    return_all: bool = False  # every rank's value back to the driver, not rank 0's alone


@dataclass
class RankOutput:
    value: Any
    reports: list[dict[str, Any]] = field(default_factory=list)  # rank 0's metrics events


@dataclass(frozen=True)
class UserCall:
    """``fn(*args, **kwargs)`` on one rank, with the engine and :func:`context` set up."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    settings: RunSettings

    def __call__(self, ctx: Any) -> RankOutput:
        """``ctx``: the barrier task's :class:`~lepton_spark.cluster.task.RankContext`."""
        heartbeat = HeartbeatSender(ctx.report, ctx.rank, ctx.slot.host) if ctx.report else None
        try:
            return run_on_rank(
                self,
                ctx.slot.rank,
                ctx.slot.size,
                ctx.cpus,
                report=ctx.report,
                beat=heartbeat.beat if heartbeat is not None else None,
            )
        finally:
            if heartbeat is not None:
                heartbeat.close()


def run_on_rank(
    call: UserCall,
    rank: int,
    size: int,
    task_cpus: int | None = None,
    report: Callable[[Event], None] | None = None,
    beat: Callable[..., None] | None = None,
) -> RankOutput:
    """The engine, the context, the function (a plain call: a test runs it without Spark)."""
    s = call.settings
    cfg = TrainConfig(
        backend="ddp" if s.backend == "none" else s.backend,
        device=s.device,  # type: ignore[arg-type]
        gloo_timeout_s=s.gloo_timeout_s,
        stall_timeout_s=s.stall_timeout_s or 300.0,
        num_workers=size,
    )
    engine = None if s.backend == "none" else start_engine(cfg)
    if engine is not None and engine.name == "horovod":
        tell_rendezvous_ready(engine.rank())
    local_rank = engine.local_rank() if engine is not None else int(os.environ.get("LOCAL_RANK", 0))
    local_size = (
        engine.local_size() if engine is not None else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    )
    device = getattr(engine, "device", None) or choose_device(s.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads(cfg, local_size, task_cpus))
    context = Context(
        rank=rank,
        size=size,
        local_rank=local_rank,
        local_size=local_size,
        device=device,
        backend=s.backend,
        attempt=s.attempt,
        checkpoint=Checkpoints(s.checkpoint_dir, rank),
        engine=engine,
        report=report,
        beat=beat,
    )
    set_current(context)
    clean = False
    try:
        value = call.fn(*call.args, **call.kwargs)
        clean = True
    finally:
        set_current(None)
        if engine is not None:
            engine.shutdown(clean)
    # Only what run() returns travels back: rank 0's value unless every rank's was asked for.
    return RankOutput(value if rank == 0 or s.return_all else None, context.kept)
