"""Models: built from the config and the feature spec, ordinary ``nn.Module``s.

Every model's ``forward`` takes one dict of tensors (:mod:`lepton_spark.spec` lists the keys) and
returns ``[rows, outputs]``: class logits for classification, one value for regression.
Built in:

- ``mlp``: numeric features, an embedding per categorical feature and the array features
  (flattened), through ``hidden`` layers;
- ``linear``: logistic regression (classification) or linear regression: one linear layer over
  the numeric features, the one-hot categorical features (an embedding of width ``outputs`` is
  exactly that) and the flattened arrays;
- ``cnn``: a small convolutional network over the first array feature, shape ``[C, H, W]``;
  ``options``: ``channels`` (default ``[32, 64]``), ``hidden`` from the config;
- ``transformer``: a Transformer encoder over the first text feature, trained from scratch;
  ``options``: ``d_model`` (64), ``heads`` (4), ``layers`` (2), ``feedforward`` (128);
- ``hf``: a pretrained Hugging Face sequence classifier (``model.pretrained``: a folder saved with
  ``save_pretrained``, a path or an object-store URI) fine-tuned over the first text feature,
  tokenised with its own tokenizer (:mod:`lepton_spark.hf`); ``options`` go to its config
  (``hidden_dropout_prob``, ...);
- ``kmeans``: ``k`` centroids over the numeric features, trained by Lloyd's iterations across the
  ranks (:func:`lepton_spark.training.kmeans.train_kmeans`); ``options``: ``k`` (8),
  ``iterations`` (50), ``tolerance`` (1e-4); ``forward`` gives minus the squared distance to each
  centroid.

A user model is ``name: "my_pkg.models:build"``: ``build(spec, **options)`` returns an
``nn.Module`` with the same ``forward``; it must be importable where the ranks run (installed, or
shipped with ``--py-files``). It needs no change to run distributed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lepton_spark.config import ModelConfig
from lepton_spark.spec import PAD_TOKEN, FeatureSpec

Inputs = dict[str, torch.Tensor]


def _flat_arrays(spec: FeatureSpec, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[a.name].reshape(len(inputs[a.name]), -1) for a in spec.arrays]


class TabularMLP(nn.Module):
    """An MLP over numeric features, one embedding per categorical feature and flat arrays."""

    def __init__(
        self,
        spec: FeatureSpec,
        hidden: list[int],
        embedding_dim: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.embeddings = nn.ModuleList(
            nn.Embedding(c.cardinality, embedding_dim) for c in spec.categorical
        )
        width = (
            len(spec.numeric)
            + embedding_dim * len(spec.categorical)
            + sum(a.length for a in spec.arrays)
        )
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, spec.output_size))
        self.body = nn.Sequential(*layers)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        categorical = inputs["categorical"]
        parts = [inputs["numeric"]]
        parts += [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        parts += _flat_arrays(self.spec, inputs)
        return self.body(torch.cat(parts, dim=1))


class LinearModel(nn.Module):
    """Logistic / linear regression: ``W x + b`` over numeric, one-hot categorical, arrays."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.spec = spec
        out = spec.output_size
        width = len(spec.numeric) + sum(a.length for a in spec.arrays)
        self.dense = nn.Linear(width, out)
        # A one-hot vector times a weight matrix is a row of it: an embedding of width ``out``.
        self.one_hot = nn.ModuleList(nn.Embedding(c.cardinality, out) for c in spec.categorical)
        for emb in self.one_hot:
            nn.init.zeros_(emb.weight)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        x = torch.cat([inputs["numeric"], *_flat_arrays(self.spec, inputs)], dim=1)
        out = self.dense(x)
        categorical = inputs["categorical"]
        for i, emb in enumerate(self.one_hot):
            out = out + emb(categorical[:, i])
        return out


class SmallCNN(nn.Module):
    """Conv-ReLU blocks (the last one max-pooled) and a small head, over one image array."""

    def __init__(
        self, spec: FeatureSpec, channels: list[int], hidden: list[int], dropout: float
    ) -> None:
        super().__init__()
        if not spec.arrays or len(spec.arrays[0].shape) != 3:
            raise ValueError(
                "model 'cnn' needs an array feature of shape [channels, height, width]"
            )
        self.image = spec.arrays[0].name
        c, h, w = spec.arrays[0].shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            c = out
        layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout)]
        width = c * (h // 2) * (w // 2)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, spec.output_size))
        self.body = nn.Sequential(*layers)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.body(inputs[self.image])


class TextTransformer(nn.Module):
    """Token and position embeddings, a Transformer encoder, mean over the real tokens, a head."""

    def __init__(
        self,
        spec: FeatureSpec,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        feedforward: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not spec.texts:
            raise ValueError("model 'transformer' needs a text feature (features.text)")
        text = spec.texts[0]
        self.text = text.name
        self.tokens = nn.Embedding(text.tokens, d_model, padding_idx=PAD_TOKEN)
        self.positions = nn.Embedding(text.max_length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, spec.output_size)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        ids = inputs[self.text]
        padding = ids == PAD_TOKEN
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        # A text with no tokens at all would be all padding: let it attend to its first slot.
        padding = padding & ~(padding.all(dim=1, keepdim=True) & (positions == 0))
        x = self.norm(self.encoder(x, src_key_padding_mask=padding))
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


class HFClassifier(nn.Module):
    """``AutoModelForSequenceClassification`` over the first text feature: ``forward(inputs)``
    → logits ``[rows, outputs]``, as every model here; the attention mask is ``ids != pad id``.

    ``weights``: read the pretrained weights (training); a served model is rebuilt from the
    config alone and gets its trained weights after (:mod:`lepton_spark.serving.network_file`).
    """

    def __init__(
        self, spec: FeatureSpec, pretrained: str, weights: bool = True, **options: Any
    ) -> None:
        super().__init__()
        from lepton_spark import hf

        if not spec.texts:
            raise ValueError("model 'hf' needs a text feature (features.text)")
        hf.offline()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        text = spec.texts[0]
        self.text = text.name
        self.pad_id = int(text.pad_id)
        self.pretrained = pretrained
        folder = str(hf.local_folder(pretrained))
        config = AutoConfig.from_pretrained(
            folder, num_labels=spec.output_size, local_files_only=True, **options
        )
        if spec.task == "regression":
            config.problem_type = "regression"
        if weights:
            # A head of another size (a checkpoint fine-tuned for other labels) is made anew.
            self.net = AutoModelForSequenceClassification.from_pretrained(
                folder, config=config, local_files_only=True, ignore_mismatched_sizes=True
            )
        else:
            self.net = AutoModelForSequenceClassification.from_config(config)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        ids = inputs[self.text]
        mask = (ids != self.pad_id).long()
        mask[:, 0] = 1  # a text with no tokens at all still attends to its first slot
        return self.net(input_ids=ids, attention_mask=mask).logits

    def fsdp_blocks(self) -> list[nn.Module]:
        """The encoder's layers (the classes the model says must not be split), for FSDP."""
        names = set(getattr(self.net, "_no_split_modules", None) or [])
        return [m for m in self.net.modules() if type(m).__name__ in names]


class KMeans(nn.Module):
    """``k`` centroids over the numeric features; ``forward`` = −squared distance to each."""

    def __init__(self, spec: FeatureSpec, k: int = 8) -> None:
        super().__init__()
        if not spec.numeric:
            raise ValueError("model 'kmeans' clusters numeric features: name some")
        self.register_buffer("centroids", torch.zeros(k, len(spec.numeric)))

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return -torch.cdist(inputs["numeric"], self.centroids).pow(2)


BUILT_IN = ("mlp", "linear", "cnn", "transformer", "kmeans")


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """``"package.module:function"`` → the function (raises ``ValueError`` saying what failed)."""
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"model {name!r}: cannot import {module_name!r} ({err}); install it or ship it with "
            "--py-files / SparkContext.addPyFile"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {module_name} has no function {attribute!r}")
    return factory


def resolve_callable(name: str, what: str) -> Callable[..., Any]:
    """A user's loss or metric function named ``"package.module:function"``."""
    try:
        return resolve_factory(name)
    except ValueError as err:
        raise ValueError(str(err).replace("model", what, 1)) from None


def build_model(
    cfg: ModelConfig, spec: FeatureSpec, seed: int | None = None, pretrained: bool = True
) -> nn.Module:
    """The configured model, initialised from ``seed`` when given (``pretrained``: an ``hf``
    model reads its pretrained weights; a served one is rebuilt without them)."""
    if seed is not None:
        torch.manual_seed(seed)
    options = dict(cfg.options)
    if cfg.name == "mlp":
        return TabularMLP(spec, list(cfg.hidden), cfg.embedding_dim, cfg.dropout)
    if cfg.name == "linear":
        return LinearModel(spec)
    if cfg.name == "cnn":
        channels = list(options.pop("channels", [32, 64]))
        return SmallCNN(spec, channels, list(cfg.hidden), cfg.dropout)
    if cfg.name == "transformer":
        return TextTransformer(spec, dropout=cfg.dropout, **options)
    if cfg.name == "kmeans":
        return KMeans(spec, k=int(options.get("k", 8)))
    if cfg.name == "hf":
        if not cfg.pretrained:
            raise ValueError("model 'hf' needs model.pretrained (a save_pretrained folder)")
        return HFClassifier(spec, cfg.pretrained, weights=pretrained, **options)
    model = resolve_factory(cfg.name)(spec, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def trained_network(
    cfg: ModelConfig, spec: FeatureSpec, state_dict: dict[str, torch.Tensor]
) -> nn.Module:
    """The configured network with trained weights, for serving (eval mode, on the CPU)."""
    model = build_model(cfg, spec, pretrained=False)  # the trained weights come next
    model.load_state_dict(state_dict)
    return model.eval()
