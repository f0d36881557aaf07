"""Models: built from the config and the feature spec, ordinary ``nn.Module``s."""

from __future__ import annotations

import torch
from torch import nn

from lepton_spark.config import ModelConfig
from lepton_spark.spec import FeatureSpec


class TabularMLP(nn.Module):
    """An MLP over numeric features and one embedding per categorical feature.

    ``forward(numeric [rows, n_numeric] float32, categorical [rows, n_categorical] int64)`` returns
    class logits ``[rows, num_classes]``.
    """

    def __init__(
        self,
        n_numeric: int,
        cardinalities: list[int],
        num_classes: int,
        hidden: list[int],
        embedding_dim: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, embedding_dim) for n in cardinalities)
        width = n_numeric + embedding_dim * len(cardinalities)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.body = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [numeric]
        parts += [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.body(torch.cat(parts, dim=1))


def build_model(cfg: ModelConfig, spec: FeatureSpec, seed: int | None = None) -> nn.Module:
    """The configured model, initialised from ``seed`` when given."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.name == "mlp":
        return TabularMLP(
            n_numeric=len(spec.numeric),
            cardinalities=[c.cardinality for c in spec.categorical],
            num_classes=spec.num_classes,
            hidden=list(cfg.hidden),
            embedding_dim=cfg.embedding_dim,
            dropout=cfg.dropout,
        )
    raise ValueError(f"unknown model {cfg.name!r}")
