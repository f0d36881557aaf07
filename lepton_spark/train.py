"""The per-rank training function: a plain function, callable with or without Spark.

``train_worker(spec)`` initialises Horovod from the ``HOROVOD_*`` environment (or as a single
rank when there is none), reads this rank's shards, trains data-parallel with
``hvd.DistributedOptimizer`` and returns the metrics history (and, on rank 0, the trained weights).
No Spark, no MLflow: progress and metrics leave through the ``report`` callback.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lepton_spark.checkpoint import Checkpoint, Position, load_checkpoint, save_checkpoint
from lepton_spark.config import ModelConfig, TrainConfig
from lepton_spark.errors import InputError
from lepton_spark.loader import ShardLoader
from lepton_spark.manifest import Manifest, read_manifest
from lepton_spark.models import build_model
from lepton_spark.watchdog import (
    CHECKPOINT,
    EPOCH_CHECKPOINT,
    EVALUATING,
    REDUCING,
    TRAINING,
    Heartbeat,
)

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]
CONFUSION_MAX_CLASSES = 100  # above: no confusion matrix (its allreduce would grow as classes²)
Beat = Callable[..., None]  # beat(epoch, step, doing=TRAINING, n=0): see lepton_spark.watchdog


@dataclass(frozen=True)
class TrainSpec:
    """Everything a rank needs: where the shards are, and how to train."""

    shard_folder: str
    train: TrainConfig
    model: ModelConfig
    verify_shards: bool = True
    checkpoint_dir: str | None = None  # resume from / write checkpoints here (rank 0 writes)
    attempt: int = 0  # which attempt of the training stage this is (0: the first)


@dataclass
class TrainResult:
    rank: int
    size: int
    device: str
    steps_per_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # last validation: rows by label, columns predicted
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint it started at
    state_dict: bytes | None = None  # rank 0 only: torch.save of the model's state_dict

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        if self.state_dict is None:
            raise ValueError(f"rank {self.rank} carries no weights; rank 0 does")
        return torch.load(io.BytesIO(self.state_dict), weights_only=True)


def choose_device(preference: str, local_rank: int) -> torch.device:
    """``cuda:<local_rank mod visible GPUs>`` when CUDA is wanted and present, else the CPU.

    Under Spark, ``CUDA_VISIBLE_DEVICES`` holds just the GPUs Spark assigned to this task.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference == "cuda":
        raise RuntimeError("train.device is 'cuda' but this rank sees no CUDA device")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How a rank computes: ``autocast`` dtype (``None``: fp32) and whether gradients are scaled."""

    autocast: torch.dtype | None = None
    scaler: bool = False

    @property
    def name(self) -> str:
        if self.autocast is None:
            return "fp32"
        return str(self.autocast).removeprefix("torch.") + ("+scaler" if self.scaler else "")


def choose_precision(
    mixed: bool, device: torch.device, bf16_supported: bool | None = None
) -> Precision:
    """fp32 unless ``mixed``; then bf16 autocast where the device has bf16 (CPUs, Ampere and
    newer GPUs), else fp16 autocast with a gradient scaler (fp16's range needs one)."""
    if not mixed:
        return Precision()
    if device.type == "cuda":
        if bf16_supported is None:  # native bf16 from Ampere (8.x) on; older GPUs only emulate it
            bf16_supported = torch.cuda.get_device_capability(device)[0] >= 8
        return Precision(torch.bfloat16) if bf16_supported else Precision(torch.float16, True)
    return Precision(torch.bfloat16)


def scaled_lr(cfg: TrainConfig, size: int) -> float:
    """Linear scaling: ``lr`` is for one rank's batch; ``size`` ranks average ``size`` batches."""
    return cfg.lr * size if cfg.lr_scaling == "linear" else cfg.lr


def make_optimizer(cfg: TrainConfig, params: Any, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def make_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: constant, or cosine decay to zero over the run."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _autocast(device: torch.device, precision: Precision) -> Any:
    return torch.autocast(
        device.type, dtype=precision.autocast, enabled=precision.autocast is not None
    )


def evaluate(
    model: nn.Module,
    loader: ShardLoader,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    precision: Precision = Precision(),
    num_classes: int = 2,
) -> torch.Tensor:
    """``[loss sum, correct, rows, confusion (label-major, num_classes²)…]`` over the loader, as a
    float64 tensor (for one allreduce); no confusion counts above ``CONFUSION_MAX_CLASSES``."""
    cells = num_classes * num_classes if num_classes <= CONFUSION_MAX_CLASSES else 0
    totals = torch.zeros(3 + cells, dtype=torch.float64)
    confusion = torch.zeros(max(cells, 1), dtype=torch.long, device=device)
    model.eval()
    with torch.no_grad():
        for n, batch in enumerate(loader.epoch(0)):
            if on_batch is not None:
                on_batch(n)
            batch = batch.to(device)
            with _autocast(device, precision):
                logits = model(batch.numeric, batch.categorical).float()
            predicted = logits.argmax(dim=1)
            totals[0] += F.cross_entropy(logits, batch.label, reduction="sum").item()
            totals[1] += (predicted == batch.label).sum().item()
            totals[2] += len(batch)
            if cells:
                confusion += torch.bincount(batch.label * num_classes + predicted, minlength=cells)
    totals[3:] = confusion[:cells].cpu().to(torch.float64)
    return totals


def _threads(cfg: TrainConfig, local_size: int) -> int:
    return cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // local_size)


def _no_beat(epoch: int, step: int, doing: int = TRAINING, n: int = 0) -> None:
    pass


def train_worker(
    spec: TrainSpec, report: Report | None = None, beat: Beat | None = None
) -> TrainResult:
    """Train on this rank's shards; every rank must call it (it joins Horovod collectives).

    ``report`` receives rank 0's events (progress, epoch metrics); ``beat`` (every rank's) is told
    where the rank is at each step, for the driver's stall watch (:mod:`lepton_spark.watchdog`).
    """
    import horovod.torch as hvd

    # Set before hvd.init(); a value already in the environment (a user's) wins.
    os.environ.setdefault("HOROVOD_CYCLE_TIME", str(spec.train.horovod_cycle_time_ms))
    hvd.init()
    try:
        return _train(spec, hvd, report if hvd.rank() == 0 else None, beat or _no_beat)
    finally:
        hvd.shutdown()


def _train(spec: TrainSpec, hvd: Any, report: Report | None, beat: Beat) -> TrainResult:
    cfg = spec.train
    rank, size = hvd.rank(), hvd.size()
    torch.set_num_threads(_threads(cfg, hvd.local_size()))
    manifest: Manifest = read_manifest(spec.shard_folder)
    features = manifest.feature_spec
    train_split, val_split = manifest.split("train"), manifest.split("validation")
    problem = train_split.training_problem(size, cfg.batch_size, cfg.tail)
    if problem:  # the driver checks this before submitting; callers without it get it here
        raise InputError(f"rank {rank}: {problem}")
    steps = train_split.steps_per_epoch(size, cfg.batch_size, cfg.tail)
    device = choose_device(cfg.device, hvd.local_rank())
    precision = choose_precision(cfg.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    common: dict[str, Any] = {
        "n_numeric": len(features.numeric),
        "n_categorical": len(features.categorical),
        "verify": spec.verify_shards,
        "pin_memory": device.type == "cuda",
    }
    common["on_verified"] = functools.partial(beat, -1)  # start-up moves while checksumming
    train_loader = ShardLoader(
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
    val_loader = ShardLoader(
        spec.shard_folder,
        val_split.for_rank(rank, size),
        batch_size=max(cfg.batch_size, 4096),
        drop_last=False,
        **common,
    )

    model = build_model(spec.model, features, seed=cfg.seed).to(device)
    optimizer = make_optimizer(cfg, model.parameters(), scaled_lr(cfg, size))
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    schedule = make_schedule(cfg, optimizer, total_steps=steps * cfg.epochs)
    position, history, resumed = _resume(spec, hvd, model, optimizer, schedule)
    # Optimizer state first: initialising it may step the parameters, which the broadcast fixes.
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    if report:
        report(
            {
                "event": "start",
                "size": size,
                "device": str(device),
                "precision": precision.name,
                "epochs": cfg.epochs,
                "steps_per_epoch": steps,
                "attempt": spec.attempt,
                "resumed_from": list(resumed) if resumed else None,
                # Where the ranks' lepton_spark came from (an installed package, or the wheel
                # spark-submit shipped with --py-files).
                "code": os.path.dirname(__file__),
            }
        )
    global_step = position.global_step
    confusion: list[list[int]] | None = None
    fault = planned_fault(spec, rank)
    for epoch in range(position.epoch, cfg.epochs):
        done = position.step if epoch == position.epoch else 0
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        window = _Window(done, loss_sum)
        for step, batch in enumerate(train_loader.epoch(epoch), start=1):
            beat(epoch, step)
            if step <= done:  # batches the checkpoint already trained on (same order)
                continue
            batch = batch.to(device)
            optimizer.zero_grad()
            with _autocast(device, precision):
                logits = model(batch.numeric, batch.categorical)
            loss = F.cross_entropy(logits.float(), batch.label)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:  # Horovod's recipe: allreduce, unscale, then step without a second allreduce
                scaler.scale(loss).backward()
                optimizer.synchronize()
                scaler.unscale_(optimizer)
                with optimizer.skip_synchronize():
                    scaler.step(optimizer)
                scaler.update()
            schedule.step()
            loss_sum += loss.detach()
            global_step += 1
            if fault is not None and global_step == fault[1]:
                inject_fault(fault[0], rank, global_step)
            if report and (step % cfg.progress_every_steps == 0 or step == steps):
                # Rank 0's view: its own loss (the ranks' mean comes with the epoch's metrics),
                # the cluster's throughput since the last report.
                report(
                    {
                        "event": "progress",
                        "epoch": epoch + 1,
                        "step": step,
                        "steps": steps,
                        "global_step": global_step,
                        "loss": loss_sum.item() / (step - done),
                        **window.advance(step, loss_sum, cfg.batch_size * size),
                    }
                )
            every = cfg.checkpoint_every_steps
            if every and global_step % every == 0 and step < steps:
                beat(epoch, step, CHECKPOINT)
                _checkpoint(
                    spec,
                    rank,
                    model,
                    optimizer,
                    schedule,
                    history,
                    Position(epoch, step, global_step),
                )
        seconds = time.perf_counter() - started
        val = evaluate(
            model,
            val_loader,
            device,
            functools.partial(beat, epoch, steps, EVALUATING),
            precision,
            features.num_classes,
        )
        beat(epoch, steps, REDUCING)
        # One allreduce per epoch: [rank mean train loss, val loss sum, correct, rows].
        mean_loss = (loss_sum.cpu() / max(steps - done, 1)).to(torch.float64).reshape(1)
        totals = hvd.allreduce(torch.cat([mean_loss, val]), op=hvd.Sum, name="epoch_totals")
        train_loss, val = totals[0] / size, totals[1:4]
        k = features.num_classes
        if k <= CONFUSION_MAX_CLASSES:
            confusion = totals[4:].round().to(torch.long).reshape(k, k).tolist()
        metrics = {
            "train_loss": float(train_loss),
            "val_loss": float(val[0] / max(val[2], 1)),
            "val_accuracy": float(val[1] / max(val[2], 1)),
            "samples_per_second": (steps - done) * cfg.batch_size * size / seconds,
            "epoch_seconds": seconds,
        }
        history.append({"epoch": epoch + 1, **metrics})
        beat(epoch, steps, EPOCH_CHECKPOINT)
        _checkpoint(
            spec, rank, model, optimizer, schedule, history, Position(epoch + 1, 0, global_step)
        )
        if report:
            report({"event": "epoch", "epoch": epoch + 1, "metrics": metrics})

    weights = None
    if rank == 0:
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
        weights = buffer.getvalue()
    return TrainResult(
        rank=rank,
        size=size,
        device=str(device),
        steps_per_epoch=steps,
        history=history,
        state_dict=weights,
        confusion=confusion,
        resumed_from=resumed,
    )


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


def _resume(
    spec: TrainSpec, hvd: Any, model: nn.Module, optimizer: Any, schedule: Any
) -> tuple[Position, list[dict[str, float]], tuple[int, int] | None]:
    """Load the run's checkpoint on rank 0 (if there is one) and agree on the position.

    Rank 0 loads the model, optimizer and schedule state (the broadcasts that follow give the
    model and optimizer to the other ranks); the position, history and schedule state go to
    every rank here.
    """
    found = None
    if hvd.rank() == 0 and spec.checkpoint_dir:
        ckpt = load_checkpoint(spec.checkpoint_dir)
        if ckpt is not None:
            model.load_state_dict(ckpt.model)
            optimizer.load_state_dict(ckpt.optimizer)
            found = (ckpt.position, ckpt.history, ckpt.schedule)
    found = hvd.broadcast_object(found, root_rank=0, name="resume")
    if found is None:
        return Position(), [], None
    position, history, schedule_state = found
    schedule.load_state_dict(schedule_state)
    log.info("rank %d resumes at epoch %d, step %d", hvd.rank(), position.epoch, position.step)
    return position, history, (position.epoch, position.step)


def _checkpoint(
    spec: TrainSpec,
    rank: int,
    model: nn.Module,
    optimizer: Any,
    schedule: Any,
    history: list[dict[str, float]],
    position: Position,
) -> None:
    if rank != 0 or not spec.checkpoint_dir:
        return
    save_checkpoint(
        spec.checkpoint_dir,
        Checkpoint(
            position=position,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            history=list(history),
        ),
    )


FAULT_ENV = "LEPTON_FAULT_INJECT"


def planned_fault(spec: TrainSpec, rank: int) -> tuple[str, int] | None:
    """Test hook, off unless ``train.fault_inject`` or ``LEPTON_FAULT_INJECT`` is set: the fault
    (``kill`` or ``hang``) and the global step it hits this rank at, on the first attempt only,
    so that a retry can succeed."""
    fault = spec.train.fault_inject or os.environ.get(FAULT_ENV)
    if not fault or spec.attempt != 0:
        return None
    kind, fault_rank, fault_step = fault.split(":")
    return (kind, int(fault_step)) if int(fault_rank) == rank else None


def inject_fault(kind: str, rank: int, global_step: int) -> None:
    """``kill``: SIGKILL this rank's process (as the OOM killer would); ``hang``: sleep forever."""
    log.warning("injected fault %r on rank %d at step %d", kind, rank, global_step)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)


def train_rank(spec: TrainSpec, ctx: Any) -> TrainResult:
    """The barrier-stage entry: ``ctx`` is a :class:`lepton_spark.barrier.RankContext`."""
    if ctx.report is None:
        return train_worker(spec)
    heartbeat = Heartbeat(ctx.report, ctx.rank, ctx.slot.host)
    try:
        return train_worker(spec, report=ctx.report, beat=heartbeat.beat)
    finally:
        heartbeat.close()
