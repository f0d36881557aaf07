"""Pictures of a run for people: learning curves, the confusion matrix, residuals, as PNG bytes.

matplotlib's object-oriented API (a ``Figure`` rendered by Agg), not pyplot: no display needed,
and the process's matplotlib backend (a notebook's) is left as it is. Nothing here touches MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from lepton_spark.names import (
    TRAIN_CENTROID_SHIFT,
    TRAIN_COST,
    TRAIN_LOSS,
    VAL_ACCURACY,
    VAL_LOSS,
    VAL_R2,
)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


_LOSSES = {
    TRAIN_LOSS: ("o-", "train loss (epoch mean)"),
    VAL_LOSS: ("s-", "validation loss"),
    TRAIN_COST: ("o-", "k-means cost (Σ squared distance)"),
}
_SCORES = {
    VAL_ACCURACY: "Validation accuracy",
    VAL_R2: "Validation R²",
    TRAIN_CENTROID_SHIFT: "Largest centroid move (relative)",
}


def learning_curves(
    history: Sequence[dict[str, float]],
    step_loss: Sequence[tuple[int, float]] = (),
    steps_per_epoch: int | None = None,
) -> bytes:
    """Loss (per-step train loss, per-epoch train and validation loss, or the k-means cost) and
    the task's score per epoch (accuracy, R², or how far the centroids still move).

    ``step_loss``: ``(global step, loss)`` pairs; with ``steps_per_epoch`` the epoch metrics are
    drawn at their last step, on the same axis.
    """
    figure = Figure(figsize=(11, 4))
    loss_ax, score_ax = figure.subplots(1, 2)
    epochs = [int(h["epoch"]) for h in history]
    stepped = bool(step_loss) and bool(steps_per_epoch)
    at = [e * steps_per_epoch for e in epochs] if stepped and steps_per_epoch else epochs
    if stepped:
        steps, losses = zip(*step_loss, strict=True)
        loss_ax.plot(steps, losses, color="0.7", linewidth=1, label="train loss (rank 0, window)")
    for key, (style, label) in _LOSSES.items():
        if history and key in history[0]:
            loss_ax.plot(at, [h[key] for h in history], style, label=label)
    loss_ax.set_xlabel("step" if stepped else "epoch")
    loss_ax.set_title("Loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    score = next((k for k in _SCORES if history and k in history[0]), None)
    if score is not None:
        values = [h[score] for h in history]
        score_ax.plot(epochs, values, "o-", color="tab:green")
        for e, v in zip(epochs, values, strict=True):
            score_ax.annotate(
                f"{v:.4f}", (e, v), textcoords="offset points", xytext=(0, 6), ha="center"
            )
        score_ax.set_title(_SCORES[score])
    score_ax.set_xlabel("epoch" if score != TRAIN_CENTROID_SHIFT else "iteration")
    score_ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(len(epochs) // 10, 1)])
    score_ax.grid(alpha=0.3)
    return _png(figure)


def residuals(predicted: np.ndarray, actual: np.ndarray, max_points: int = 5_000) -> bytes:
    """Predicted against actual (a sample of rows) and the distribution of the residuals."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    figure = Figure(figsize=(11, 4.2))
    scatter_ax, hist_ax = figure.subplots(1, 2)
    pick = np.random.default_rng(0).permutation(len(actual))[:max_points]
    scatter_ax.scatter(actual[pick], predicted[pick], s=4, alpha=0.35)
    low, high = float(np.min(actual)), float(np.max(actual))
    scatter_ax.plot([low, high], [low, high], color="tab:red", linewidth=1, label="perfect")
    scatter_ax.set_xlabel("actual")
    scatter_ax.set_ylabel("predicted")
    scatter_ax.set_title(f"Validation: predicted vs actual ({len(pick):,} of {len(actual):,} rows)")
    scatter_ax.legend()
    scatter_ax.grid(alpha=0.3)
    error = predicted - actual
    hist_ax.hist(error, bins=60, color="tab:blue", alpha=0.8)
    hist_ax.axvline(0.0, color="tab:red", linewidth=1)
    rmse, mae = float(np.sqrt(np.mean(error**2))), float(np.mean(np.abs(error)))
    hist_ax.set_title(f"Residuals (predicted − actual): RMSE {rmse:.4f}, MAE {mae:.4f}")
    hist_ax.set_xlabel("residual")
    hist_ax.grid(alpha=0.3)
    return _png(figure)


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str] | None = None) -> bytes:
    """Counts with the row-normalised share in each cell; rows are true labels."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = counts.shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(3 + 0.6 * k, 14)
    figure = Figure(figsize=(size, size * 0.85))
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's rows")
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"Validation confusion matrix ({counts.sum():,} rows, accuracy {accuracy:.4f})")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]:,}\n{share[i, j]:.1%}",
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=9,
                )
    return _png(figure)
