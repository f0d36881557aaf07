"""The per-rank training function: a plain function, callable with or without Spark.

``train_worker(spec)`` starts the engine ``train.backend`` names (Horovod, DDP or FSDP) from the
environment the barrier task set (or as a single rank when there is none), reads this rank's
shards, trains data-parallel and returns the metrics history (and, on rank 0, the trained weights).
No Spark, no MLflow: progress and metrics leave through the ``report`` callback.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.request
from typing import Any

import torch

from lepton_spark.events import Phase
from lepton_spark.shards.loader import ShardLoader, loader_files
from lepton_spark.training.checkpoint import Position
from lepton_spark.training.devices import threads
from lepton_spark.training.engines import Engine, start_engine
from lepton_spark.training.heartbeat import Beat, HeartbeatSender, no_beat
from lepton_spark.training.job import Recorder, Report, TrainResult, TrainSpec, state_bytes
from lepton_spark.training.kmeans import train_kmeans
from lepton_spark.training.loop import (
    RankData,
    announce,
    checkpoint,
    evaluate,
    open_data,
    reduce_epoch,
    report_epoch,
    resume,
    set_up,
    train_epoch,
)

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainSpec", "train_rank", "train_worker"]


def train_worker(
    spec: TrainSpec,
    report: Report | None = None,
    beat: Beat | None = None,
    task_cpus: int | None = None,
) -> TrainResult:
    """Train on this rank's shards; every rank must call it (it joins the engine's collectives).

    ``report`` receives rank 0's events (progress, epoch metrics); ``beat`` (every rank's) is told
    where the rank is at each step, for the driver's stall watch
    (:mod:`lepton_spark.cluster.watchdog`); ``task_cpus``, the CPUs Spark gave the rank's task,
    bounds its torch threads.
    """
    engine = start_engine(spec.train)
    if engine.name == "horovod":
        tell_rendezvous_ready(engine.rank())
    clean = False
    try:
        recorder = Recorder(report) if engine.rank() == 0 else None
        result = _train(spec, engine, recorder, beat or no_beat, task_cpus)
        result.reports = recorder.kept if recorder is not None else []
        clean = True
        return result
    finally:
        engine.shutdown(clean)


def tell_rendezvous_ready(rank: int, timeout_s: float = 10.0) -> None:
    """Tell the stage's rendezvous server this rank is initialised, so that it can close as
    soon as every rank is (the same URL Horovod's HTTP store builds from its environment:
    ``http://{ADDR}:{PORT}/lepton_ready/{rank}``). Best effort: a server that is gone already,
    or a run without one, is no reason to stop training."""
    addr = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if not addr or not port:
        return
    url = f"http://{addr}:{port}/lepton_ready/{rank}"
    request = urllib.request.Request(url, data=b"", method="PUT")
    # Straight to rank 0's executor, never through an http_proxy of the environment: the path
    # holds the stage's secret, and Horovod's own HTTP store goes direct too.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(request, timeout=timeout_s):
            pass
    except OSError as err:
        log.debug("rank %d: the rendezvous server did not take the ready call: %s", rank, err)


def _train(
    spec: TrainSpec, engine: Engine, report: Report | None, beat: Beat, task_cpus: int | None = None
) -> TrainResult:
    rank, size = engine.rank(), engine.size()
    torch.set_num_threads(threads(spec.train, engine.local_size(), task_cpus))
    data = open_data(spec, rank, size, engine.local_rank(), beat)
    if data.manifest.feature_spec.task == "clustering":
        every_row = _every_row(spec, data, rank, size, beat)
        return train_kmeans(spec, engine, report, beat, every_row, data.validation, data.device)
    trainer = set_up(spec, engine, data)
    start = resume(spec, engine, trainer, data.steps)
    forwards = _evaluation_forwards(engine, data.validation)
    announce(report, spec, size, data, trainer, start)
    history = list(start.history)
    confusion = None
    position = start.position
    for epoch in range(position.epoch, spec.train.epochs):
        run = train_epoch(spec, rank, size, data, trainer, position, history, report, beat)
        on_batch = functools.partial(beat, epoch, data.steps, Phase.EVALUATING)
        val = evaluate(
            engine.evaluated(trainer.model),
            data.validation,
            data.device,
            trainer.objective,
            on_batch,
            trainer.precision,
            forwards,
            spare=lambda: next(iter(data.train.epoch(0))),
        )
        beat(epoch, data.steps, Phase.REDUCING)
        metrics, confusion = reduce_epoch(engine, trainer, run, val, spec.train.batch_size)
        history.append({"epoch": epoch + 1, **metrics})
        beat(epoch, data.steps, Phase.EPOCH_CHECKPOINT)
        position = Position(epoch + 1, 0, run.global_step)
        checkpoint(spec, rank, trainer, history, position)
        report_epoch(report, epoch + 1, metrics)
    weights = engine.model_state(trainer.model)  # FSDP: gathered from every rank's shard
    return TrainResult(
        rank=rank,
        size=size,
        device=str(data.device),
        steps_per_epoch=data.steps,
        history=history,
        state_dict=state_bytes(weights) if rank == 0 else None,
        confusion=confusion,
        resumed_from=start.checkpoint_at,
    )


def _evaluation_forwards(engine: Engine, validation: ShardLoader) -> int | None:
    """FSDP: the most validation batches any rank has (each forward pass is a collective, so
    every rank runs that many); other engines: no such rule."""
    if not engine.shard_evaluation():
        return None
    counts = engine.allgather(torch.tensor([len(validation)], dtype=torch.int64), name="val_n")
    return int(counts.max())


def _every_row(spec: TrainSpec, data: RankData, rank: int, size: int, beat: Beat) -> ShardLoader:
    """k-means visits every training row once over the ranks: no steps to keep equal."""
    files, share = loader_files(data.train_split, rank, size, every_row=True)
    return ShardLoader(
        spec.shard_folder,
        files,
        share=share,
        layout=data.train.layout,
        batch_size=max(spec.train.batch_size, 8192),
        drop_last=False,
        verify=False,  # checked by the training loader
        pin_memory=data.device.type == "cuda",
        on_verified=functools.partial(beat, -1),
    )


def train_rank(spec: TrainSpec, ctx: Any) -> TrainResult:
    """The barrier-stage entry: ``ctx`` is a :class:`lepton_spark.cluster.task.RankContext`
    (the rank process always gives it a ``report``; :func:`train_worker` is the Spark-free call)."""
    heartbeat = HeartbeatSender(ctx.report, ctx.rank, ctx.slot.host)
    try:
        return train_worker(spec, report=ctx.report, beat=heartbeat.beat, task_cpus=ctx.cpus)
    finally:
        heartbeat.close()
