"""What training minimises and validation measures, per task: pure torch, no engine.

Validation is additive: each rank fills a float64 vector of sums (:meth:`Objective.accumulate`),
the ranks add them in one allreduce, and :meth:`Objective.metrics` turns the total into metrics.

- classification: cross-entropy; ``val/loss``, ``val/accuracy`` and the confusion matrix (up to
  ``CONFUSION_MAX_CLASSES`` classes);
- regression: mean squared error; ``val/loss`` (= ``val/mse``), ``val/mse``, ``val/mae``,
  ``val/r2``;
- ``train.loss: "pkg.mod:fn"``: ``fn(outputs, labels, weights or None)`` → a scalar, used for
  training and for ``val/loss``; ``outputs`` are ``[rows, classes]`` logits, or ``[rows]`` values
  for regression (as the labels);
- ``train.metrics: ["pkg.mod:fn", …]``: ``fn(outputs, labels)`` → one value per row, averaged over
  the validation split as ``val/<fn>``.

Sample weights (``features.weight``) weigh the training loss; validation metrics are unweighted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lepton_spark.config import TrainConfig
from lepton_spark.models import resolve_callable
from lepton_spark.names import VAL_ACCURACY, VAL_LOSS, VAL_MAE, VAL_MSE, VAL_R2, user_metric
from lepton_spark.spec import FeatureSpec

CONFUSION_MAX_CLASSES = 100  # above: no confusion matrix (its allreduce would grow as classes²)


class Objective:
    def __init__(self, spec: FeatureSpec, cfg: TrainConfig) -> None:
        if spec.task == "clustering":
            raise ValueError("clustering is trained by k-means, not by a loss")
        self.spec = spec
        self.classification = spec.task == "classification"
        self.custom_loss: Callable[..., torch.Tensor] | None = (
            resolve_callable(cfg.loss, "loss") if cfg.loss else None
        )
        self.custom_metrics = [(m, resolve_callable(m, "metric")) for m in cfg.metrics]
        k = spec.num_classes or 0
        self.cells = k * k if self.classification and k <= CONFUSION_MAX_CLASSES else 0
        # classification: loss, correct, rows, confusion…; regression: loss, Σ|err|, rows, Σy,
        # Σy², Σerr²
        self.base = 3 if self.classification else 6
        self.size = self.base + self.cells + len(self.custom_metrics)

    def _prepare(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        if not self.classification and outputs.dim() == 2 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        return outputs

    def per_row_loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs = self._prepare(outputs, labels)
        if self.classification:
            return F.cross_entropy(outputs, labels, reduction="none")
        return (outputs - labels.float()) ** 2

    def loss(
        self, outputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training loss of a batch (weighted mean when there are weights)."""
        if self.custom_loss is not None:
            return self.custom_loss(self._prepare(outputs, labels), labels, weights)
        per_row = self.per_row_loss(outputs, labels)
        if weights is None:
            return per_row.mean()
        weights = weights.float()
        return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.float64)

    def accumulate(self, totals: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        rows = len(labels)
        if self.custom_loss is not None:
            loss_sum = float(self.custom_loss(self._prepare(outputs, labels), labels, None)) * rows
        else:
            loss_sum = float(self.per_row_loss(outputs, labels).sum())
        totals[0] += loss_sum
        prepared = self._prepare(outputs, labels)
        if self.classification:
            predicted = prepared.argmax(dim=1)
            totals[1] += float((predicted == labels).sum())
            totals[2] += rows
            if self.cells:
                k = self.spec.num_classes or 0
                counts = torch.bincount(labels * k + predicted, minlength=self.cells)
                totals[3 : 3 + self.cells] += counts.cpu().to(torch.float64)
        else:
            y = labels.double()
            totals[1] += float((prepared.double() - y).abs().sum())
            totals[2] += rows
            totals[3] += float(y.sum())
            totals[4] += float((y * y).sum())
            totals[5] += float(((prepared.double() - y) ** 2).sum())
        start = self.base + self.cells
        for i, (_, fn) in enumerate(self.custom_metrics):
            totals[start + i] += float(fn(prepared, labels).double().sum())

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        rows = max(float(totals[2]), 1.0)
        out: dict[str, float] = {VAL_LOSS: float(totals[0]) / rows}
        if self.classification:
            out[VAL_ACCURACY] = float(totals[1]) / rows
        else:
            mse = float(totals[5]) / rows
            mean = float(totals[3]) / rows
            variance = float(totals[4]) / rows - mean * mean
            out[VAL_MSE] = mse
            out[VAL_MAE] = float(totals[1]) / rows
            out[VAL_R2] = 1.0 - mse / variance if variance > 0 else float("nan")
        start = self.base + self.cells
        for i, (name, _) in enumerate(self.custom_metrics):
            out[user_metric(name)] = float(totals[start + i]) / rows
        return out

    def confusion(self, totals: torch.Tensor) -> list[list[int]] | None:
        if not self.cells:
            return None
        k = self.spec.num_classes or 0
        return totals[3 : 3 + self.cells].round().to(torch.long).reshape(k, k).tolist()
