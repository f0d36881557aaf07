"""The supervised rank loop, as steps: set up, resume, train an epoch, evaluate, reduce, checkpoint.

Every rank runs the same steps in the same order (they join the same Horovod collectives);
:func:`lepton_spark.training.worker.train_worker` calls them. ``hvd`` is ``horovod.torch`` (or
anything with its API), passed in so that this module imports no engine.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lepton_spark.errors import InputError
from lepton_spark.events import Epoch, Phase, Progress, Start
from lepton_spark.models import build_model
from lepton_spark.names import TRAIN_EPOCH_SECONDS, TRAIN_LOSS, TRAIN_SAMPLES_PER_SECOND, current
from lepton_spark.shards.loader import Layout, ShardLoader
from lepton_spark.shards.manifest import Manifest, SplitInfo, read_manifest
from lepton_spark.training.checkpoint import Checkpoint, Position, load_checkpoint, save_checkpoint
from lepton_spark.training.devices import (
    FP32,
    Precision,
    autocast,
    choose_device,
    choose_precision,
)
from lepton_spark.training.faults import inject_fault, planned_fault
from lepton_spark.training.heartbeat import Beat
from lepton_spark.training.job import Report, TrainSpec, code_location
from lepton_spark.training.objectives import Objective
from lepton_spark.training.optim import make_optimizer, make_schedule, scaled_lr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankData:
    """This rank's view of the shards: the manifest, its loaders, the steps every rank runs."""

    manifest: Manifest
    train_split: SplitInfo
    train: ShardLoader
    validation: ShardLoader
    steps: int
    device: torch.device


def open_data(spec: TrainSpec, rank: int, size: int, local_rank: int, beat: Beat) -> RankData:
    """Read the manifest, check this rank can take a full step, and open its loaders (their
    shards' checksums are verified here, the heartbeat moving as they are)."""
    cfg = spec.train
    manifest = read_manifest(spec.shard_folder)
    features = manifest.feature_spec
    train_split, val_split = manifest.split("train"), manifest.split("validation")
    batch_size = 1 if features.task == "clustering" else cfg.batch_size  # k-means: no steps
    problem = train_split.training_problem(size, batch_size, cfg.tail)
    if problem:  # the driver checks this before submitting; callers without it get it here
        raise InputError(f"rank {rank}: {problem}")
    steps = train_split.steps_per_epoch(size, cfg.batch_size, cfg.tail)
    device = choose_device(cfg.device, local_rank)
    common: dict[str, Any] = {
        "layout": Layout.of(features),
        "verify": spec.verify_shards,
        "pin_memory": device.type == "cuda",
        "on_verified": functools.partial(beat, -1),  # start-up moves while checksumming
    }
    train = ShardLoader(
        spec.shard_folder,
        train_split.for_rank(rank, size),
        batch_size=cfg.batch_size,
        steps=steps,
        shuffle=cfg.shuffle,
        shuffle_buffer=cfg.shuffle_buffer,
        tail=cfg.tail,
        seed=cfg.seed + 7919 * rank,
        **common,
    )
    validation = ShardLoader(
        spec.shard_folder,
        val_split.for_rank(rank, size),
        batch_size=max(cfg.batch_size, 4096),
        drop_last=False,
        **common,
    )
    return RankData(manifest, train_split, train, validation, steps, device)


@dataclass
class Trainer:
    """One rank's model, optimizer and schedule, and how it computes a step."""

    model: nn.Module
    optimizer: Any  # hvd.DistributedOptimizer over a torch optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    layout: Layout
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler | None

    def step(self, batch: Any) -> torch.Tensor:
        """Forward, backward (allreduced), optimizer and schedule step; the batch's loss."""
        batch = batch.to(self.device)
        self.optimizer.zero_grad()
        with autocast(self.device, self.precision):
            outputs = self.model(self.layout.inputs(batch))
        loss = self.objective.loss(outputs.float(), batch.label, batch.weight)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # Horovod's recipe: allreduce, unscale, then step without a second allreduce
            self.scaler.scale(loss).backward()
            self.optimizer.synchronize()
            self.scaler.unscale_(self.optimizer)
            with self.optimizer.skip_synchronize():
                self.scaler.step(self.optimizer)
            self.scaler.update()
        self.schedule.step()
        return loss.detach()


def set_up(spec: TrainSpec, hvd: Any, data: RankData) -> Trainer:
    """The model (seeded), the optimizer (learning rate scaled for the ranks, wrapped in
    Horovod's ``DistributedOptimizer``), the schedule over the whole run, the objective."""
    cfg = spec.train
    features = data.manifest.feature_spec
    precision = choose_precision(cfg.mixed_precision, data.device)
    model = build_model(spec.model, features, seed=cfg.seed).to(data.device)
    optimizer = make_optimizer(cfg, model.parameters(), scaled_lr(cfg, hvd.size()))
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    return Trainer(
        model=model,
        optimizer=optimizer,
        schedule=make_schedule(cfg, optimizer, total_steps=data.steps * cfg.epochs),
        objective=Objective(features, cfg),
        layout=data.train.layout,
        device=data.device,
        precision=precision,
        scaler=torch.amp.GradScaler(data.device.type) if precision.scaler else None,
    )


@dataclass(frozen=True)
class Resumed:
    """Where this attempt starts: the position, the history so far, the checkpoint's place."""

    position: Position
    history: list[dict[str, float]]
    checkpoint_at: tuple[int, int] | None  # (epoch, step), None: from the start


def broadcast_bytes(hvd: Any, data: bytes, root_rank: int = 0, name: str = "bytes") -> bytes:
    """``data`` from ``root_rank`` to every rank, as tensors (its length, then its bytes)."""
    size = torch.tensor([len(data) if hvd.rank() == root_rank else 0], dtype=torch.int64)
    size = int(hvd.broadcast(size, root_rank, name=f"{name}.size")[0])
    if size == 0:
        return b""
    if hvd.rank() == root_rank:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buffer = torch.zeros(size, dtype=torch.uint8)
    return bytes(hvd.broadcast(buffer, root_rank, name=f"{name}.data").numpy())


def resume(spec: TrainSpec, hvd: Any, trainer: Trainer) -> Resumed:
    """Load the run's checkpoint on rank 0 (if there is one), agree on the position, and give
    every rank rank 0's model and optimizer state.

    Nothing is unpickled from the network: rank 0's resume state (optimizer and schedule state,
    position, history) goes to the other ranks as a tensor of ``torch.save`` bytes that they read
    with ``torch.load(weights_only=True)`` (tensors and plain values only), and the parameters as
    tensors (Horovod's ``broadcast_object`` / ``broadcast_optimizer_state`` would unpickle
    whatever arrives on a Gloo pair).
    """
    payload = b""
    if hvd.rank() == 0 and spec.checkpoint_dir:
        ckpt = load_checkpoint(spec.checkpoint_dir)
        if ckpt is not None:
            trainer.model.load_state_dict(ckpt.model)
            trainer.optimizer.load_state_dict(ckpt.optimizer)
            state = {
                "optimizer": ckpt.optimizer,
                "position": dataclasses.asdict(ckpt.position),
                "history": ckpt.history,
                "schedule": ckpt.schedule,
            }
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = buffer.getvalue()
    payload = broadcast_bytes(hvd, payload, name="resume")
    found = None
    if payload:
        state = torch.load(io.BytesIO(payload), weights_only=True)
        if hvd.rank() != 0:
            trainer.optimizer.load_state_dict(state["optimizer"])
        found = (Position(**state["position"]), state["history"], state["schedule"])
    hvd.broadcast_parameters(trainer.model.state_dict(), root_rank=0)
    if found is None:
        return Resumed(Position(), [], None)
    position, history, schedule_state = found
    history = [{current(k): v for k, v in epoch.items()} for epoch in history]  # 0.1 names
    trainer.schedule.load_state_dict(schedule_state)
    log.info("rank %d resumes at epoch %d, step %d", hvd.rank(), position.epoch, position.step)
    return Resumed(position, history, (position.epoch, position.step))


def announce(
    report: Report | None, spec: TrainSpec, size: int, data: RankData, trainer: Trainer, at: Resumed
) -> None:
    """Rank 0 tells the driver the attempt has started (the console's first line, tags)."""
    if report:
        report(
            Start(
                size=size,
                device=str(data.device),
                precision=trainer.precision.name,
                epochs=spec.train.epochs,
                steps_per_epoch=data.steps,
                attempt=spec.attempt,
                resumed_from=at.checkpoint_at,
                code=code_location(),
            )
        )


@dataclass(frozen=True)
class EpochRun:
    """What training one epoch left behind, before the ranks compare notes."""

    loss_sum: torch.Tensor  # float64 on the device: this rank's summed batch losses
    steps_done: int  # steps trained in this attempt (after the checkpoint's position)
    global_step: int
    seconds: float


def train_epoch(
    spec: TrainSpec,
    rank: int,
    size: int,
    data: RankData,
    trainer: Trainer,
    start: Position,
    history: list[dict[str, float]],
    report: Report | None,
    beat: Beat,
) -> EpochRun:
    """Epoch ``start.epoch``'s steps from ``start`` (``start.step`` batches of it done, at
    ``start.global_step``; batches already trained on are skipped: the loader's order is the
    same), with progress reports, per-step checkpoints, and the planned fault of the tests."""
    cfg = spec.train
    epoch, done, global_step = start.epoch, start.step, start.global_step
    started = time.perf_counter()
    trainer.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    window = _Window(done, loss_sum)
    fault = planned_fault(cfg, spec.attempt, rank)
    for step, batch in enumerate(data.train.epoch(epoch), start=1):
        beat(epoch, step)
        if step <= done:
            continue
        loss_sum += trainer.step(batch)
        global_step += 1
        if fault is not None and global_step == fault[1]:
            inject_fault(fault[0], rank, global_step)
        if report and (step % cfg.progress_every_steps == 0 or step == data.steps):
            # Rank 0's view: its own loss (the ranks' mean comes with the epoch's metrics),
            # the cluster's throughput since the last report.
            report(
                Progress(
                    epoch=epoch + 1,
                    step=step,
                    steps=data.steps,
                    global_step=global_step,
                    loss=loss_sum.item() / (step - done),
                    **window.advance(step, loss_sum, cfg.batch_size * size),
                )
            )
        every = cfg.checkpoint_every_steps
        if every and global_step % every == 0 and step < data.steps:
            beat(epoch, step, Phase.CHECKPOINT)
            checkpoint(spec, rank, trainer, history, Position(epoch, step, global_step))
    return EpochRun(loss_sum, data.steps - done, global_step, time.perf_counter() - started)


def evaluate(
    model: nn.Module,
    loader: ShardLoader,
    device: torch.device,
    objective: Objective,
    on_batch: Callable[[int], None] | None = None,
    precision: Precision = FP32,
) -> torch.Tensor:
    """The objective's validation sums over the loader (float64, for one allreduce)."""
    totals = objective.zeros()
    layout = loader.layout
    model.eval()
    with torch.no_grad():
        for n, batch in enumerate(loader.epoch(0)):
            if on_batch is not None:
                on_batch(n)
            batch = batch.to(device)
            with autocast(device, precision):
                outputs = model(layout.inputs(batch))
            objective.accumulate(totals, outputs.float(), batch.label)
    return totals


def reduce_epoch(
    hvd: Any, trainer: Trainer, run: EpochRun, validation: torch.Tensor, batch_size: int
) -> tuple[dict[str, float], list[list[int]] | None]:
    """One allreduce per epoch — [rank mean train loss, the objective's validation sums…] —
    and the epoch's metrics and confusion matrix from it."""
    size = hvd.size()
    mean_loss = (run.loss_sum.cpu() / max(run.steps_done, 1)).to(torch.float64).reshape(1)
    totals = hvd.allreduce(torch.cat([mean_loss, validation]), op=hvd.Sum, name="epoch_totals")
    metrics = {
        TRAIN_LOSS: float(totals[0] / size),
        **trainer.objective.metrics(totals[1:]),
        TRAIN_SAMPLES_PER_SECOND: run.steps_done * batch_size * size / run.seconds,
        TRAIN_EPOCH_SECONDS: run.seconds,
    }
    return metrics, trainer.objective.confusion(totals[1:])


def checkpoint(
    spec: TrainSpec,
    rank: int,
    trainer: Trainer,
    history: list[dict[str, float]],
    position: Position,
) -> None:
    """Rank 0 writes where training stands (the other ranks hold the same state)."""
    if rank != 0 or not spec.checkpoint_dir:
        return
    save_checkpoint(
        spec.checkpoint_dir,
        Checkpoint(
            position=position,
            model=trainer.model.state_dict(),
            optimizer=trainer.optimizer.state_dict(),
            schedule=trainer.schedule.state_dict(),
            history=list(history),
        ),
    )


def report_epoch(report: Report | None, epoch: int, metrics: dict[str, float]) -> None:
    if report:
        report(Epoch(epoch=epoch, metrics=metrics))


class _Window:
    """Loss and throughput since the last progress report (what the per-step metrics show)."""

    def __init__(self, step: int, loss_sum: torch.Tensor) -> None:
        self.step = step
        self.loss = float(loss_sum)
        self.time = time.perf_counter()

    def advance(self, step: int, loss_sum: torch.Tensor, samples_per_step: int) -> dict[str, float]:
        now, loss = time.perf_counter(), float(loss_sum)
        steps = max(step - self.step, 1)
        out = {
            "window_loss": (loss - self.loss) / steps,
            "samples_per_second": steps * samples_per_step / max(now - self.time, 1e-9),
        }
        self.step, self.loss, self.time = step, loss, now
        return out
