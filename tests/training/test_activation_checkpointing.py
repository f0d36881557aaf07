"""``train.activation_checkpointing``: each block of the cnn, the transformer and an ``hf`` model
is recomputed in the backward pass, with the same loss and gradients as without it, in training
only; a model with no blocks is refused; a text pipeline trains with it on FSDP and DDP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lepton_spark import run_pipeline
from lepton_spark.config import ModelConfig, load_config
from lepton_spark.errors import ConfigError
from lepton_spark.models import build_model, set_activation_checkpointing
from lepton_spark.spec import ArrayFeature, FeatureSpec, TextFeature
from tests.hf_fixture import make_tiny_bert

ROOT = Path(__file__).resolve().parents[2]
ROWS = 6

IMAGES = FeatureSpec(
    numeric=[],
    categorical=[],
    label="y",
    num_classes=3,
    arrays=[ArrayFeature(name="img", shape=[2, 6, 6])],
)
WORDS = FeatureSpec(
    numeric=[],
    categorical=[],
    label="y",
    num_classes=3,
    texts=[TextFeature(name="doc", vocabulary=[f"w{i}" for i in range(30)], max_length=10)],
)


def _ids(tokens: int, pad: int, first: int) -> torch.Tensor:
    """Token ids with padding at the ends of some rows (and one row of padding only)."""
    ids = torch.randint(first, tokens, (ROWS, 10), generator=torch.Generator().manual_seed(3))
    ids[1, 6:] = pad
    ids[2, 3:] = pad
    ids[3, :] = pad
    return ids


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def cnn() -> tuple[nn.Module, dict[str, torch.Tensor], Callable[[nn.Module], nn.Module]]:
    model = build_model(
        ModelConfig(name="cnn", hidden=[16], dropout=0.2, options={"channels": [4, 8, 8]}),
        IMAGES,
        seed=0,
    )
    images = torch.rand(ROWS, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    return model, {"img": images}, lambda m: m.body[2]  # the second conv block's conv


def transformer() -> tuple[nn.Module, dict[str, torch.Tensor], Callable[[nn.Module], nn.Module]]:
    options = {"d_model": 16, "heads": 2, "layers": 3, "feedforward": 32}
    model = build_model(
        ModelConfig(name="transformer", dropout=0.1, options=options), WORDS, seed=0
    )
    return model, {"doc": _ids(32, 0, 1)}, lambda m: m.encoder.layers[1]


def hf(bert: Path) -> tuple[nn.Module, dict[str, torch.Tensor], Callable[[nn.Module], nn.Module]]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(bert)).vocab_size
    text = TextFeature(
        name="doc", vocabulary=[], max_length=10, tokenizer=str(bert), vocab_size=vocab, pad_id=0
    )
    spec = FeatureSpec(numeric=[], categorical=[], label="y", num_classes=3, texts=[text])
    model = build_model(ModelConfig(name="hf", pretrained=str(bert)), spec, seed=0)
    assert model.net.config.hidden_dropout_prob > 0  # dropout in the recomputed layers
    # transformers checkpoints a layer's forward, not its call (module hooks, FSDP2's, stay
    # outside): what is seen recomputed is a module inside the layer.
    return model, {"doc": _ids(vocab, 0, 5)}, lambda m: m.net.bert.encoder.layer[1].attention


@pytest.fixture(params=["cnn", "transformer", "hf"])
def case(request):
    if request.param == "hf":
        return hf(request.getfixturevalue("bert"))
    return {"cnn": cnn, "transformer": transformer}[request.param]()


def step(model: nn.Module, inputs: dict[str, torch.Tensor], block: nn.Module):
    """One training forward and backward (dropout drawn from seed 5): the loss, every gradient,
    and how many times ``block`` started a forward pass (a recomputation stops once it has
    what the backward pass needs, so a forward hook may not see its end)."""
    calls = []
    handle = block.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        labels = torch.arange(ROWS) % 3
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


def test_checkpointed_blocks_give_the_same_loss_and_gradients_and_run_twice(case):
    model, inputs, pick = case
    block = pick(model)
    keys = list(model.state_dict())
    plain_loss, plain_grads, plain_calls = step(model, inputs, block)

    set_activation_checkpointing(model, True)
    loss, grads, calls = step(model, inputs, block)
    assert (plain_calls, calls) == (1, 2)  # recomputed in the backward pass
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == plain_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert list(model.state_dict()) == keys  # what is saved and served is unchanged

    # Evaluation and scoring never checkpoint: one forward, the same outputs as without it.
    calls_in_eval = []
    handle = block.register_forward_pre_hook(lambda *_: calls_in_eval.append(1))
    model.eval()
    with torch.no_grad():
        scored = model(inputs)
    with torch.enable_grad():
        model(inputs).sum().backward()  # eval mode with autograd on (a user's own loop)
    handle.remove()
    assert len(calls_in_eval) == 2
    set_activation_checkpointing(model, False)
    with torch.no_grad():
        # (tolerances: torch's encoder has a fused inference path of its own)
        torch.testing.assert_close(model(inputs), scored, rtol=1e-6, atol=1e-6)

    # Off again: back to one forward per step, the same gradients.
    loss, grads, calls = step(model, inputs, block)
    assert calls == 1
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)


def test_a_model_without_blocks_is_refused():
    demo = ROOT / "pipelines" / "tabular_demo.yaml"
    for name in ("mlp", "linear"):
        with pytest.raises(ConfigError, match=rf"train\.activation_checkpointing.*model '{name}'"):
            load_config(demo, {"train.activation_checkpointing": True, "model.name": name})
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing.*model .kmeans."):
        load_config(
            ROOT / "pipelines" / "kmeans_blobs.yaml", {"train.activation_checkpointing": True}
        )
    # A user factory's model without the method is refused where the rank builds it.
    with pytest.raises(ValueError, match=r"train\.activation_checkpointing: model Linear"):
        set_activation_checkpointing(nn.Linear(2, 2), True)
    set_activation_checkpointing(nn.Linear(2, 2), False)  # off: nothing to do


def test_it_leaves_the_run_key_alone():
    path = ROOT / "pipelines" / "text_transformer.yaml"
    plain = load_config(path)
    on = load_config(path, {"train.activation_checkpointing": True})
    assert on.train.activation_checkpointing and not plain.train.activation_checkpointing
    assert on.training_fingerprint() == plain.training_fingerprint()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_a_text_pipeline_trains_with_checkpointing(spark, tmp_path, backend):
    cfg = load_config(
        ROOT / "pipelines" / "text_transformer.yaml",
        {
            "spark.master": "local[2]",
            "sources.docs.generate.rows": 4_000,
            "shards.rows_per_shard": 1_000,
            "shards.root": str(tmp_path / "shards"),
            "train.backend": backend,
            "train.activation_checkpointing": True,
            "train.epochs": 4,
            "train.lr": 0.003,
            "train.batch_size": 64,
            "train.checkpoint_root": str(tmp_path / "checkpoints"),
            "tracking.local_store": str(tmp_path / "mlruns-data"),
            "tracking.system_metrics_interval_s": None,
            "tracking.registered_model": None,
        },
    )
    result = run_pipeline(cfg, spark=spark, progress=lambda e: None)
    assert result.metrics["val/accuracy"] > 0.6, result.history  # chance is 0.25
