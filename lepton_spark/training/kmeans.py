"""k-means as a rank loop: Lloyd's iterations with one allreduce each (model ``kmeans``).

Each rank assigns its own rows to the nearest centroid; the centroid sums, counts and cost are
added up across the ranks. No steps to keep equal (every rank visits all its rows), no
checkpoints (a retried stage starts again: seconds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from lepton_spark.errors import InputError
from lepton_spark.events import Epoch, Phase, Start
from lepton_spark.names import (
    TRAIN_CENTROID_SHIFT,
    TRAIN_COST,
    TRAIN_EMPTY_CLUSTERS,
    TRAIN_EPOCH_SECONDS,
    TRAIN_ITERATIONS,
    VAL_COST_PER_ROW,
)
from lepton_spark.shards.loader import ShardLoader
from lepton_spark.training.heartbeat import Beat
from lepton_spark.training.job import Report, TrainResult, TrainSpec, code_location, state_bytes


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding on ``points`` (as scikit-learn's): each next center is the best of
    ``2 + log k`` candidates drawn ∝ squared distance to the chosen ones, the one that lowers the
    sample's cost most. One draw per step falls into poor optima on overlapping clusters."""
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = int(torch.randint(len(points), (1,), generator=generator))
    centers = [points[first]]
    nearest = torch.cdist(points, points[first : first + 1]).pow(2)[:, 0]
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # fewer distinct points than k: repeat one
            index = int(torch.randint(len(points), (1,), generator=generator))
            centers.append(points[index])
            continue
        candidates = torch.multinomial(
            nearest / total, trials, replacement=True, generator=generator
        )
        distances = torch.cdist(points, points[candidates]).pow(2)  # [points, trials]
        costs = torch.minimum(nearest[:, None], distances).sum(dim=0)
        best = int(torch.argmin(costs))
        centers.append(points[int(candidates[best])])
        nearest = torch.minimum(nearest, distances[:, best])
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
    engine: Any,
    report: Report | None,
    beat: Beat,
    loader: ShardLoader,
    val_loader: ShardLoader,
    device: torch.device,
) -> TrainResult:
    """Lloyd's k-means across the ranks: each rank assigns its own rows; the centroid sums,
    counts and cost are added up with one allreduce per iteration.

    Seeded with k-means++ on a sample gathered from every rank (the same on all ranks, then
    broadcast from rank 0). Stops after ``iterations`` or when no centroid moves more than
    ``tolerance`` (relative to the data's scale).
    """
    options = spec.model.options
    k = int(options.get("k", 8))
    iterations = int(options.get("iterations", 50))
    tolerance = float(options.get("tolerance", 1e-4))
    if report:
        report(
            Start(
                size=engine.size(),
                device=str(device),
                precision="fp64",
                epochs=iterations,
                steps_per_epoch=len(loader),
                attempt=spec.attempt,
                code=code_location(),
            )
        )
    centroids, scale = seed_centroids(engine, loader, k, spec.train.seed)
    centroids = centroids.to(device)
    history: list[dict[str, float]] = []
    for iteration in range(iterations):
        centroids, metrics = lloyd_step(engine, loader, centroids, scale, device, iteration, beat)
        history.append({"epoch": iteration + 1, **metrics})
        if report:
            report(Epoch(epoch=iteration + 1, metrics=metrics))
        if metrics[TRAIN_CENTROID_SHIFT] < tolerance:
            break
    history[-1].update(final_costs(engine, loader, val_loader, centroids, device))
    history[-1][TRAIN_ITERATIONS] = float(len(history))
    rank = engine.rank()
    return TrainResult(
        rank=rank,
        size=engine.size(),
        device=str(device),
        steps_per_epoch=len(loader),
        history=history,
        state_dict=state_bytes({"centroids": centroids.float()}) if rank == 0 else None,
    )


def seed_centroids(
    engine: Any, loader: ShardLoader, k: int, seed: int
) -> tuple[torch.Tensor, float]:
    """k-means++ on a sample gathered from every rank (about 1,000 rows each, spread over all its
    rows: one pass), computed the same on every rank and broadcast from rank 0; and the data's
    scale (its std), which the stopping rule measures centroid moves against."""
    per_rank = max(100 * k // engine.size(), 1_000)
    # Every ``stride``-th row of the whole pass: a sample of every part of the rank's rows (the
    # first rows alone may be one block of a sorted source).
    stride = max(1, loader.rows // per_rank)
    sample = []
    seen = 0
    for batch in loader.epoch(0):
        sample.append(batch.numeric[(-seen) % stride :: stride].double())
        seen += len(batch)
    gathered = engine.allgather(torch.cat(sample), name="kmeans_sample")
    if len(gathered) < k:
        raise InputError(
            f"k-means with k={k} needs at least {k} training rows, got {len(gathered)}"
        )
    generator = torch.Generator().manual_seed(seed)
    centroids = engine.broadcast(
        _kmeans_plus_plus(gathered, k, generator), root_rank=0, name="init"
    )
    return centroids, float(gathered.std()) or 1.0


def lloyd_step(
    engine: Any,
    loader: ShardLoader,
    centroids: torch.Tensor,
    scale: float,
    device: torch.device,
    iteration: int,
    beat: Beat,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One iteration: assign this rank's rows, add up every rank's sums and counts in one
    allreduce, move the centroids (an empty cluster keeps its place); the new centroids and
    the iteration's metrics."""
    started = time.perf_counter()
    step = 0

    def moved() -> None:
        nonlocal step
        step += 1
        beat(iteration, step)

    k = len(centroids)
    sums, counts, cost = _assign(loader, centroids, device, moved)
    beat(iteration, step, Phase.REDUCING)
    totals = engine.allreduce(
        torch.cat([sums.reshape(-1), counts, cost]).cpu(), name="kmeans_totals"
    ).to(device)
    sums, counts = totals[: k * centroids.shape[1]].reshape(k, -1), totals[-k - 1 : -1]
    updated = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    metrics = {
        TRAIN_COST: float(totals[-1]),  # of the assignment this iteration started from
        TRAIN_CENTROID_SHIFT: float((updated - centroids).norm(dim=1).max()) / scale,
        TRAIN_EMPTY_CLUSTERS: float((counts == 0).sum()),
        TRAIN_EPOCH_SECONDS: time.perf_counter() - started,
    }
    return updated, metrics


def final_costs(
    engine: Any,
    loader: ShardLoader,
    val_loader: ShardLoader,
    centroids: torch.Tensor,
    device: torch.device,
) -> dict[str, float]:
    """The final centroids' cost on the training rows and per row on the validation rows."""
    _, _, cost = _assign(loader, centroids, device, lambda: None)
    _, val_counts, val_cost = _assign(val_loader, centroids, device, lambda: None)
    final = engine.allreduce(
        torch.cat([cost, val_cost, val_counts.sum().reshape(1)]).cpu(), name="cost"
    )
    return {
        TRAIN_COST: float(final[0]),
        VAL_COST_PER_ROW: float(final[1]) / max(float(final[2]), 1.0),
    }
