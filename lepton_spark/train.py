"""The per-rank training function: a plain function, callable with or without Spark.

``train_worker(spec)`` initialises Horovod from the ``HOROVOD_*`` environment (or as a single
rank when there is none), reads this rank's shards, trains data-parallel with
``hvd.DistributedOptimizer`` and returns the metrics history (and, on rank 0, the trained weights).
No Spark, no MLflow: progress and metrics leave through the ``report`` callback.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lepton_spark.config import ModelConfig, TrainConfig
from lepton_spark.loader import ShardLoader
from lepton_spark.manifest import Manifest, read_manifest
from lepton_spark.models import build_model

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainSpec:
    """Everything a rank needs: where the shards are, and how to train."""

    shard_folder: str
    train: TrainConfig
    model: ModelConfig
    verify_shards: bool = True


@dataclass
class TrainResult:
    rank: int
    size: int
    device: str
    steps_per_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
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


def evaluate(model: nn.Module, loader: ShardLoader, device: torch.device) -> torch.Tensor:
    """``[loss sum, correct, rows]`` over the loader, as a float64 tensor (for an allreduce)."""
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for batch in loader.epoch(0):
            batch = batch.to(device)
            logits = model(batch.numeric, batch.categorical)
            totals[0] += F.cross_entropy(logits, batch.label, reduction="sum").item()
            totals[1] += (logits.argmax(dim=1) == batch.label).sum().item()
            totals[2] += len(batch)
    return totals


def _threads(cfg: TrainConfig, local_size: int) -> int:
    return cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // local_size)


def train_worker(spec: TrainSpec, report: Report | None = None) -> TrainResult:
    """Train on this rank's shards; every rank must call it (it joins Horovod collectives)."""
    import horovod.torch as hvd

    # Set before hvd.init(); a value already in the environment (a user's) wins.
    os.environ.setdefault("HOROVOD_CYCLE_TIME", str(spec.train.horovod_cycle_time_ms))
    hvd.init()
    try:
        return _train(spec, hvd, report if hvd.rank() == 0 else None)
    finally:
        hvd.shutdown()


def _train(spec: TrainSpec, hvd: Any, report: Report | None) -> TrainResult:
    cfg = spec.train
    rank, size = hvd.rank(), hvd.size()
    torch.set_num_threads(_threads(cfg, hvd.local_size()))
    manifest: Manifest = read_manifest(spec.shard_folder)
    features = manifest.feature_spec
    train_split, val_split = manifest.split("train"), manifest.split("validation")
    steps = train_split.steps_per_epoch(size, cfg.batch_size, cfg.tail)
    rows_per_rank = train_split.rows_per_rank(size)
    if steps == 0 or min(rows_per_rank) == 0:
        raise ValueError(
            f"rank {rank}: too few training rows for {size} ranks × batch {cfg.batch_size} "
            f"(rows per rank: {rows_per_rank}); lower train.batch_size or train.num_workers"
        )
    device = choose_device(cfg.device, hvd.local_rank())
    common = {
        "n_numeric": len(features.numeric),
        "n_categorical": len(features.categorical),
        "verify": spec.verify_shards,
        "pin_memory": device.type == "cuda",
    }
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
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    schedule = make_schedule(cfg, optimizer, total_steps=steps * cfg.epochs)

    if report:
        report(
            {
                "event": "start",
                "size": size,
                "device": str(device),
                "epochs": cfg.epochs,
                "steps_per_epoch": steps,
            }
        )
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step, batch in enumerate(train_loader.epoch(epoch), start=1):
            batch = batch.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch.numeric, batch.categorical), batch.label)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
            if report and (step % cfg.progress_every_steps == 0 or step == steps):
                report(
                    {
                        "event": "progress",
                        "epoch": epoch + 1,
                        "step": step,
                        "steps": steps,
                        "loss": loss_sum.item() / step,
                    }
                )
        seconds = time.perf_counter() - started
        train_loss = hvd.allreduce(loss_sum.cpu() / steps, op=hvd.Average, name="train_loss")
        val = hvd.allreduce(evaluate(model, val_loader, device), op=hvd.Sum, name="val_totals")
        metrics = {
            "train_loss": float(train_loss),
            "val_loss": float(val[0] / max(val[2], 1)),
            "val_accuracy": float(val[1] / max(val[2], 1)),
            "samples_per_second": steps * cfg.batch_size * size / seconds,
            "epoch_seconds": seconds,
        }
        history.append({"epoch": epoch + 1, **metrics})
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
    )


def train_rank(spec: TrainSpec, ctx: Any) -> TrainResult:
    """The barrier-stage entry: ``ctx`` is a :class:`lepton_spark.barrier.RankContext`."""
    return train_worker(spec, report=ctx.report)
