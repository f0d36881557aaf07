"""How a rank computes: its device, its precision, its threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
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


def threads(cfg: TrainConfig, local_size: int, task_cpus: int | None = None) -> int:
    """torch threads per rank: ``threads_per_rank``, else the CPUs this process may use (its
    affinity, and the cgroup's CPU quota when lower) shared by the host's ranks, and no more than
    the CPUs Spark gave the rank's task (``spark.task.cpus``): a 1-core task on a 96-core host
    runs 1 thread, not 48."""
    if cfg.threads_per_rank:
        return cfg.threads_per_rank
    share = max(1, int(usable_cpus()) // max(1, local_size))
    return max(1, min(share, task_cpus)) if task_cpus else share


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> float:
    """The CPUs this process may use: its CPU affinity, or the cgroup's quota when lower
    (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return min(cpus, quota) if quota else cpus


def _cgroup_quota(root: str) -> float | None:
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path(root, "cpu", "cpu.cfs_quota_us").read_text())
        period = int(Path(root, "cpu", "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
