"""How a rank computes: its device, its precision, its threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lepton_spark.config import TrainConfig


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


FP32 = Precision()


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


def autocast(device: torch.device, precision: Precision) -> Any:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    return torch.autocast(
        device.type, dtype=precision.autocast, enabled=precision.autocast is not None
    )


def threads(cfg: TrainConfig, local_size: int) -> int:
    """torch threads per rank: ``threads_per_rank``, or the host's cores shared by its ranks."""
    return cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // local_size)
