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
from torch import nn

from lepton_spark.checkpoint import Checkpoint, Position, load_checkpoint, save_checkpoint
from lepton_spark.config import ModelConfig, TrainConfig
from lepton_spark.errors import InputError
from lepton_spark.loader import Layout, ShardLoader
from lepton_spark.manifest import Manifest, read_manifest
from lepton_spark.models import build_model
from lepton_spark.objectives import Objective
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
    objective: Objective,
    on_batch: Callable[[int], None] | None = None,
    precision: Precision = Precision(),
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
            with _autocast(device, precision):
                outputs = model(layout.inputs(batch))
            objective.accumulate(totals, outputs.float(), batch.label)
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
    batch_size = 1 if features.task == "clustering" else cfg.batch_size  # k-means: no steps
    problem = train_split.training_problem(size, batch_size, cfg.tail)
    if problem:  # the driver checks this before submitting; callers without it get it here
        raise InputError(f"rank {rank}: {problem}")
    steps = train_split.steps_per_epoch(size, cfg.batch_size, cfg.tail)
    device = choose_device(cfg.device, hvd.local_rank())
    precision = choose_precision(cfg.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    layout = Layout.of(features)
    common: dict[str, Any] = {
        "layout": layout,
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

    if features.task == "clustering":
        everything = ShardLoader(  # k-means visits every row: no steps to keep equal
            spec.shard_folder,
            train_split.for_rank(rank, size),
            batch_size=max(cfg.batch_size, 8192),
            drop_last=False,
            **{**common, "verify": False},  # checked by the training loader above
        )
        return train_kmeans(spec, hvd, report, beat, everything, val_loader, device)
    objective = Objective(features, cfg)
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
                outputs = model(layout.inputs(batch))
            loss = objective.loss(outputs.float(), batch.label, batch.weight)
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
            objective,
            functools.partial(beat, epoch, steps, EVALUATING),
            precision,
        )
        beat(epoch, steps, REDUCING)
        # One allreduce per epoch: [rank mean train loss, the objective's validation sums…].
        mean_loss = (loss_sum.cpu() / max(steps - done, 1)).to(torch.float64).reshape(1)
        totals = hvd.allreduce(torch.cat([mean_loss, val]), op=hvd.Sum, name="epoch_totals")
        confusion = objective.confusion(totals[1:])
        metrics = {
            "train_loss": float(totals[0] / size),
            **objective.metrics(totals[1:]),
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


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on ``points``: each next center drawn ∝ squared distance to the chosen."""
    first = int(torch.randint(len(points), (1,), generator=generator))
    centers = [points[first]]
    nearest = torch.cdist(points, points[first : first + 1]).pow(2)[:, 0]
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # fewer distinct points than k: repeat one
            index = int(torch.randint(len(points), (1,), generator=generator))
        else:
            index = int(torch.multinomial(nearest / total, 1, generator=generator))
        centers.append(points[index])
        nearest = torch.minimum(
            nearest, torch.cdist(points, points[index : index + 1]).pow(2)[:, 0]
        )
    return torch.stack(centers)


def _assign(
    loader: ShardLoader, centroids: torch.Tensor, device: torch.device, on_batch: Callable[[], None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's per-centroid sums and counts and its cost (Σ min squared distance)."""
    k, d = centroids.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    cost = torch.zeros(1, dtype=torch.float64, device=device)
    for batch in loader.epoch(0):
        on_batch()
        x = batch.to(device).numeric.double()
        distances = torch.cdist(x, centroids).pow(2)
        best, nearest = distances.min(dim=1)
        sums.index_add_(0, nearest, x)
        counts += torch.bincount(nearest, minlength=k).double()
        cost += best.sum()
    return sums, counts, cost


def train_kmeans(
    spec: TrainSpec,
    hvd: Any,
    report: Report | None,
    beat: Beat,
    loader: ShardLoader,
    val_loader: ShardLoader,
    device: torch.device,
) -> TrainResult:
    """Lloyd's k-means across the ranks: each rank assigns its own rows; the centroid sums,
    counts and cost are added up with one Horovod allreduce per iteration.

    Seeded with k-means++ on a sample gathered from every rank (the same on all ranks, then
    broadcast from rank 0). Stops after ``iterations`` or when no centroid moves more than
    ``tolerance`` (relative to the data's scale).
    """
    options = spec.model.options
    k = int(options.get("k", 8))
    iterations = int(options.get("iterations", 50))
    tolerance = float(options.get("tolerance", 1e-4))
    rank, size = hvd.rank(), hvd.size()
    if report:
        report(
            {
                "event": "start",
                "size": size,
                "device": str(device),
                "precision": "fp64",
                "epochs": iterations,
                "steps_per_epoch": len(loader),
                "attempt": spec.attempt,
                "resumed_from": None,
                "code": os.path.dirname(__file__),
            }
        )
    per_rank = max(100 * k // size, 1_000)
    sample = []
    taken = 0
    for batch in loader.epoch(0):
        sample.append(batch.numeric[: per_rank - taken].double())
        taken += len(sample[-1])
        if taken >= per_rank:
            break
    gathered = hvd.allgather(torch.cat(sample), name="kmeans_sample")
    if len(gathered) < k:
        raise InputError(
            f"k-means with k={k} needs at least {k} training rows, got {len(gathered)}"
        )
    generator = torch.Generator().manual_seed(spec.train.seed)
    centroids = hvd.broadcast(_kmeans_plus_plus(gathered, k, generator), root_rank=0, name="init")
    scale = float(gathered.std()) or 1.0
    centroids = centroids.to(device)
    history: list[dict[str, float]] = []
    for iteration in range(iterations):
        started = time.perf_counter()
        step = 0

        def moved(iteration: int = iteration) -> None:
            nonlocal step
            step += 1
            beat(iteration, step)

        sums, counts, cost = _assign(loader, centroids, device, moved)
        beat(iteration, step, REDUCING)
        totals = hvd.allreduce(
            torch.cat([sums.reshape(-1), counts, cost]).cpu(), op=hvd.Sum, name="kmeans_totals"
        ).to(device)
        sums, counts = totals[: k * centroids.shape[1]].reshape(k, -1), totals[-k - 1 : -1]
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        shift = float((updated - centroids).norm(dim=1).max()) / scale
        centroids = updated
        metrics = {
            "train_cost": float(totals[-1]),  # of the assignment this iteration started from
            "centroid_shift": shift,
            "empty_clusters": float((counts == 0).sum()),
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append({"epoch": iteration + 1, **metrics})
        if report:
            report({"event": "epoch", "epoch": iteration + 1, "metrics": metrics})
        if shift < tolerance:
            break
    # The cost of the final centroids, on the training and the validation rows.
    _, _, cost = _assign(loader, centroids, device, lambda: None)
    _, val_counts, val_cost = _assign(val_loader, centroids, device, lambda: None)
    final = hvd.allreduce(
        torch.cat([cost, val_cost, val_counts.sum().reshape(1)]).cpu(), op=hvd.Sum, name="cost"
    )
    history[-1].update(
        {
            "train_cost": float(final[0]),
            "val_cost_per_row": float(final[1]) / max(float(final[2]), 1.0),
            "iterations": float(len(history)),
        }
    )
    weights = None
    if rank == 0:
        buffer = io.BytesIO()
        torch.save({"centroids": centroids.float().cpu()}, buffer)
        weights = buffer.getvalue()
    return TrainResult(
        rank=rank,
        size=size,
        device=str(device),
        steps_per_epoch=len(loader),
        history=history,
        state_dict=weights,
    )


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
