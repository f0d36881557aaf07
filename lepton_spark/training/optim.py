"""The optimizer and the learning-rate schedule a rank trains with (before the engine wraps it)."""

from __future__ import annotations

from typing import Any

import torch

from lepton_spark.config import TrainConfig


def scaled_lr(cfg: TrainConfig, size: int) -> float:
    """Linear scaling: ``lr`` is for one rank's batch; a step of ``size`` ranks, each
    accumulating ``accumulate_steps`` batches, averages ``size × accumulate_steps`` batches."""
    if cfg.lr_scaling != "linear":
        return cfg.lr
    return cfg.lr * size * cfg.accumulate_steps


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
