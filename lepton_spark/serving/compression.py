"""Compression after training: magnitude pruning and/or dynamic int8 quantization, measured.

The trained network is copied and compressed; both are scored on the same validation rows and
timed on the same batch on the CPU, and their serialised sizes compared. No Spark, no MLflow:
the pipeline logs the result as a model version of its own.
"""

from __future__ import annotations

import copy
import gzip
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from lepton_spark.config import CompressConfig
from lepton_spark.serving.network_file import quantize, weights_bytes

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Measurement:
    accuracy: float
    size_bytes: int  # the weights file the served model stores (network_file: safetensors)
    gzip_bytes: int  # the same, gzip-compressed (zeros from pruning show here)
    latency_ms: float  # median CPU time for one batch, one thread
    zero_weight_share: float  # of the Linear layers' weights


@dataclass(frozen=True)
class CompressionReport:
    method: str
    rows: int
    batch_rows: int
    before: Measurement
    after: Measurement

    @property
    def accuracy_cost(self) -> float:
        """Accuracy points lost (negative: gained)."""
        return self.before.accuracy - self.after.accuracy

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "accuracy_cost": self.accuracy_cost}

    def summary(self) -> str:
        b, a = self.before, self.after
        return (
            f"{self.method}: accuracy {b.accuracy:.4f} → {a.accuracy:.4f} (cost "
            f"{self.accuracy_cost:+.4f} on {self.rows:,} validation rows), size "
            f"{b.size_bytes:,} → {a.size_bytes:,} bytes ({a.size_bytes / b.size_bytes:.2f}×; gzip "
            f"{b.gzip_bytes:,} → {a.gzip_bytes:,}), CPU latency per {self.batch_rows}-row batch "
            f"{b.latency_ms:.3f} → {a.latency_ms:.3f} ms"
        )


def compress(network: nn.Module, cfg: CompressConfig) -> nn.Module:
    """A compressed copy of ``network`` (which is left as it is), in eval mode."""
    model = copy.deepcopy(network).cpu().eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if cfg.prune is not None and linears:
        # Global: the smallest |w| across all Linear layers, so wide layers give up more.
        prune.global_unstructured(
            [(m, "weight") for m in linears], pruning_method=prune.L1Unstructured, amount=cfg.prune
        )
        for m in linears:
            prune.remove(m, "weight")  # the zeros become the weights themselves
    if cfg.quantize:
        model = quantize(model)
    return model


def _zero_share(model: nn.Module) -> float:
    total = zeros = 0
    for m in model.modules():
        weight = None
        if isinstance(m, nn.Linear):
            weight = m.weight.detach()
        elif hasattr(m, "weight") and callable(m.weight) and "quantized" in type(m).__module__:
            weight = m.weight().dequantize()
        if weight is not None:
            total += weight.numel()
            zeros += int((weight == 0).sum())
    return zeros / max(total, 1)


def _sizes(model: nn.Module) -> tuple[int, int]:
    data = weights_bytes(model)
    return len(data), len(gzip.compress(data, compresslevel=6))


def _latency_ms(model: nn.Module, inputs: Inputs) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(5):
                model(inputs)
            times = []
            for _ in range(30):
                started = time.perf_counter()
                model(inputs)
                times.append((time.perf_counter() - started) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _accuracy(model: nn.Module, batches: list[tuple[Inputs, np.ndarray]]) -> float:
    correct = rows = 0
    with torch.inference_mode():
        for inputs, label in batches:
            logits = model(inputs)
            correct += int((logits.argmax(dim=1).numpy() == label).sum())
            rows += len(label)
    return correct / max(rows, 1)


def measure(
    before: nn.Module,
    after: nn.Module,
    batches: Iterable[tuple[Inputs, np.ndarray]],
    cfg: CompressConfig,
) -> CompressionReport:
    """Score both on the same ``(model inputs, labels)`` batches (up to ``eval_rows``)."""
    kept: list[tuple[Inputs, np.ndarray]] = []
    rows = 0
    for inputs, label in batches:
        take = min(len(label), cfg.eval_rows - rows)
        kept.append(({k: v[:take] for k, v in inputs.items()}, label[:take]))
        rows += take
        if rows >= cfg.eval_rows:
            break
    if rows == 0:
        raise ValueError("no validation rows to measure the compressed model on")
    n = cfg.latency_batch
    first = {k: torch.cat([b[0][k] for b in kept])[:n] for k in kept[0][0]}

    def one(model: nn.Module) -> Measurement:
        size, gz = _sizes(model)
        return Measurement(
            accuracy=_accuracy(model, kept),
            size_bytes=size,
            gzip_bytes=gz,
            latency_ms=_latency_ms(model, first),
            zero_weight_share=_zero_share(model),
        )

    return CompressionReport(
        method=cfg.method,
        rows=rows,
        batch_rows=len(next(iter(first.values()))),
        before=one(before),
        after=one(after),
    )
