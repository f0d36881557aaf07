"""Pictures of a run for people: learning curves and the confusion matrix, as PNG bytes.

matplotlib with the Agg backend (no display needed); nothing here touches MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def learning_curves(
    history: Sequence[dict[str, float]],
    step_loss: Sequence[tuple[int, float]] = (),
    steps_per_epoch: int | None = None,
) -> bytes:
    """Loss (per-step train loss, per-epoch train and validation loss) and validation accuracy.

    ``step_loss``: ``(global step, loss)`` pairs; with ``steps_per_epoch`` the epoch metrics are
    drawn at their last step, on the same axis.
    """
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [int(h["epoch"]) for h in history]
    at = [e * steps_per_epoch for e in epochs] if steps_per_epoch else epochs
    unit = "step" if steps_per_epoch else "epoch"
    if step_loss and steps_per_epoch:
        steps, losses = zip(*step_loss, strict=True)
        loss_ax.plot(steps, losses, color="0.7", linewidth=1, label="train loss (rank 0, window)")
    loss_ax.plot(at, [h["train_loss"] for h in history], "o-", label="train loss (epoch mean)")
    loss_ax.plot(at, [h["val_loss"] for h in history], "s-", label="validation loss")
    loss_ax.set_xlabel(unit)
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("Loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", color="tab:green")
    for e, a in zip(epochs, (h["val_accuracy"] for h in history), strict=True):
        acc_ax.annotate(f"{a:.4f}", (e, a), textcoords="offset points", xytext=(0, 6), ha="center")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("Validation accuracy")
    acc_ax.set_xticks(epochs)
    acc_ax.grid(alpha=0.3)
    return _png(figure)


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str] | None = None) -> bytes:
    """Counts with the row-normalised share in each cell; rows are true labels."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = counts.shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(3 + 0.6 * k, 14)
    figure, ax = plt.subplots(figsize=(size, size * 0.85))
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
