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

``train.activation_checkpointing`` (:func:`set_activation_checkpointing`): ``cnn``,
``transformer`` and ``hf`` recompute each block's forward pass in the backward pass instead of
keeping its activations (``torch.utils.checkpoint``, non-reentrant), in training only.

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
from torch.utils.checkpoint import checkpoint

from lepton_spark.config import ModelConfig
from lepton_spark.spec import PAD_TOKEN, FeatureSpec

Inputs = dict[str, torch.Tensor]


def _checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` recomputes its blocks now: turned on, training, with autograd on (never
    in evaluation or scoring)."""
    return bool(getattr(model, "activation_checkpointing", False)) and (
        model.training and torch.is_grad_enabled()
    )


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
        self.activation_checkpointing = False  # a plain attribute: the state dict is the same
        self.conv_blocks = len(channels)  # body[2i], body[2i + 1]: conv block i
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
        x = inputs[self.image]
        if not _checkpointing(self):
            return self.body(x)
        for i in range(self.conv_blocks):  # each conv-ReLU block recomputed in the backward pass
            x = checkpoint(self.body[2 * i : 2 * i + 2], x, use_reentrant=False)
        return self.body[2 * self.conv_blocks :](x)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each conv block's forward pass in the backward pass (training only)."""
        self.activation_checkpointing = on


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
        self.activation_checkpointing = False  # a plain attribute: the state dict is the same
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
        x = self.norm(self._encode(x, padding))
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)

    def _encode(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if not _checkpointing(self):
            return self.encoder(x, src_key_padding_mask=padding)
        # What the encoder does in training (its fast paths are for inference), one
        # checkpointed layer at a time: the mask as the additive float one it makes.
        mask = torch.zeros_like(padding, dtype=x.dtype).masked_fill(padding, float("-inf"))
        for layer in self.encoder.layers:
            x = checkpoint(layer, x, None, mask, use_reentrant=False)
        return x if self.encoder.norm is None else self.encoder.norm(x)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each encoder layer's forward pass in the backward pass (training only)."""
        self.activation_checkpointing = on


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

    def set_activation_checkpointing(self, on: bool) -> None:
        """The Hugging Face model's own checkpointing of its layers, non-reentrant
        (``activation_checkpointing_enable``, what transformers 5 calls
        ``gradient_checkpointing_enable``; its layers checkpoint in training mode only)."""
        if on:
            self.net.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        elif self.net.is_activation_checkpointing:
            self.net.activation_checkpointing_disable()

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


CHECKPOINTED = ("cnn", "transformer", "hf")  # built-in models with blocks to checkpoint


def set_activation_checkpointing(model: nn.Module, on: bool) -> nn.Module:
    """``train.activation_checkpointing``: the model recomputes each block's forward pass in the
    backward pass (training only; evaluation, scoring and the state dict are unchanged). The
    model's own ``set_activation_checkpointing(on)`` does it (``cnn``, ``transformer``, ``hf``,
    or a user factory's model that has one); turning it on for a model without one is an error,
    not a silent no-op."""
    hook = getattr(model, "set_activation_checkpointing", None)
    if callable(hook):
        hook(on)
    elif on:
        raise ValueError(
            f"train.activation_checkpointing: model {type(model).__name__} has no blocks to "
            "checkpoint (no set_activation_checkpointing(on) method): turn it off, or give the "
            "model one that checkpoints its blocks with torch.utils.checkpoint"
        )
    return model


def trained_network(
    cfg: ModelConfig, spec: FeatureSpec, state_dict: dict[str, torch.Tensor]
) -> nn.Module:
    """The configured network with trained weights, for serving (eval mode, on the CPU)."""
    model = build_model(cfg, spec, pretrained=False)  # the trained weights come next
    model.load_state_dict(state_dict)
    return model.eval()
