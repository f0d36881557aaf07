"""Losses and validation metrics per task: the sums the ranks add up give the right metrics."""

import math

import pytest
import torch
import torch.nn.functional as F

from lepton_spark.config import TrainConfig
from lepton_spark.spec import CategoricalFeature, FeatureSpec
from lepton_spark.training.objectives import Objective

CLASSES = FeatureSpec(
    numeric=["a"],
    categorical=[CategoricalFeature(name="c", vocabulary=["x"])],
    label="y",
    num_classes=3,
)
REGRESSION = CLASSES.model_copy(update={"task": "regression", "num_classes": None})


def test_classification_metrics_from_sums_split_across_ranks():
    objective = Objective(CLASSES, TrainConfig())
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 2])
    rank0, rank1 = objective.zeros(), objective.zeros()
    objective.accumulate(rank0, logits[:2], labels[:2])
    objective.accumulate(rank1, logits[2:], labels[2:])
    metrics = objective.metrics(rank0 + rank1)
    assert metrics["val/accuracy"] == 0.5
    expected = F.cross_entropy(logits, labels).item()
    assert metrics["val/loss"] == pytest.approx(expected)
    assert objective.confusion(rank0 + rank1) == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]


def test_weights_weigh_the_training_loss():
    objective = Objective(CLASSES, TrainConfig())
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 0])
    per_row = F.cross_entropy(logits, labels, reduction="none")
    weighted = objective.loss(logits, labels, torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(per_row[0].item())
    assert objective.loss(logits, labels).item() == pytest.approx(per_row.mean().item())


def test_regression_mse_mae_r2():
    objective = Objective(REGRESSION, TrainConfig())
    outputs = torch.tensor([[1.0], [2.0], [2.0], [5.0]])
    labels = torch.tensor([1.0, 3.0, 2.0, 4.0])
    totals = objective.zeros()
    objective.accumulate(totals, outputs, labels)
    metrics = objective.metrics(totals)
    assert metrics["val/mse"] == pytest.approx(0.5) and metrics["val/loss"] == pytest.approx(0.5)
    assert metrics["val/mae"] == pytest.approx(0.5)
    variance = labels.var(unbiased=False).item()
    assert metrics["val/r2"] == pytest.approx(1 - 0.5 / variance)
    assert objective.confusion(totals) is None
    assert objective.loss(outputs, labels).item() == pytest.approx(0.5)


def test_custom_loss_and_metric_by_name(tmp_path, monkeypatch):
    (tmp_path / "user_fns.py").write_text(
        "def l1(outputs, labels, weights):\n"
        "    assert outputs.shape == labels.shape  # regression: [rows], as the labels\n"
        "    return (outputs - labels).abs().mean()\n"
        "def over(outputs, labels):\n"
        "    assert outputs.shape == labels.shape\n"
        "    return (outputs > labels).float()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = TrainConfig(loss="user_fns:l1", metrics=["user_fns:over"])
    objective = Objective(REGRESSION, cfg)
    outputs, labels = torch.tensor([[1.0], [4.0]]), torch.tensor([2.0, 2.0])
    assert objective.loss(outputs, labels).item() == pytest.approx(1.5)
    totals = objective.zeros()
    objective.accumulate(totals, outputs, labels)
    metrics = objective.metrics(totals)
    assert metrics["val/over"] == 0.5
    assert metrics["val/loss"] == pytest.approx(1.5)
    assert metrics["val/mse"] == pytest.approx(2.5)  # measured whatever the loss is
    with pytest.raises(ValueError, match="loss 'user_fns:nope'"):
        Objective(REGRESSION, TrainConfig(loss="user_fns:nope"))
    assert math.isnan(metrics["val/r2"])  # constant labels: R² is undefined
