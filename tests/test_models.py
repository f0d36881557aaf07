"""The built-in models and user factories: inputs in, one output per class out."""

import pytest
import torch

from lepton_spark.config import ModelConfig
from lepton_spark.models import build_model
from lepton_spark.spec import (
    ArrayFeature,
    CategoricalFeature,
    FeatureSpec,
    Standardization,
    TextFeature,
)

SPEC = FeatureSpec(
    numeric=["a", "b"],
    categorical=[CategoricalFeature(name="c", vocabulary=["x", "y"])],
    label="y",
    num_classes=3,
    standardize={"a": Standardization(mean=1.0, std=2.0)},
    fill_value=-5.0,
)


def test_model_maps_numeric_and_categorical_to_class_logits():
    model = build_model(ModelConfig(hidden=[8]), SPEC, seed=0).eval()
    logits = model(
        {
            "numeric": torch.tensor([[0.5, -1.0], [1.5, 0.0]]),
            "categorical": torch.tensor([[2], [1]]),
        }
    )
    assert logits.shape == (2, 3)


IMAGE_TEXT = FeatureSpec(
    numeric=[],
    categorical=[],
    label="y",
    num_classes=4,
    arrays=[ArrayFeature(name="img", shape=[1, 4, 4])],
    texts=[TextFeature(name="doc", vocabulary=["good", "bad", "film"], max_length=5)],
)


@pytest.mark.parametrize("name", ["mlp", "linear", "cnn", "transformer"])
def test_built_in_models_map_inputs_to_one_output_per_class(name):
    model = build_model(ModelConfig(name=name, hidden=[8]), IMAGE_TEXT, seed=0).eval()
    inputs = {
        "numeric": torch.zeros(3, 0),
        "categorical": torch.zeros(3, 0, dtype=torch.long),
        "img": torch.rand(3, 1, 4, 4),
        "doc": torch.tensor([[2, 3, 0, 0, 0], [4, 1, 2, 3, 4], [0, 0, 0, 0, 0]]),
    }
    out = model(inputs)
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_regression_models_have_one_output():
    spec = SPEC.model_copy(update={"task": "regression", "num_classes": None})
    for name in ("mlp", "linear"):
        model = build_model(ModelConfig(name=name, hidden=[8]), spec, seed=0)
        out = model(
            {"numeric": torch.zeros(2, 2), "categorical": torch.ones(2, 1, dtype=torch.long)}
        )
        assert out.shape == (2, 1)


def test_linear_model_is_logistic_regression_on_one_hot_categories():
    model = build_model(ModelConfig(name="linear"), SPEC, seed=0)
    with torch.no_grad():
        model.one_hot[0].weight[2] = torch.tensor([1.0, 2.0, 3.0])
    numeric = torch.tensor([[0.5, -1.0]])
    base = model({"numeric": numeric, "categorical": torch.tensor([[0]])})
    shifted = model({"numeric": numeric, "categorical": torch.tensor([[2]])})
    torch.testing.assert_close(shifted - base, torch.tensor([[1.0, 2.0, 3.0]]))


def test_a_user_factory_is_imported_and_given_the_spec_and_options(tmp_path, monkeypatch):
    package = tmp_path / "factory_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        "from torch import nn\n"
        "def build(spec, width=4):\n"
        "    first = nn.Linear(len(spec.numeric), width)\n"
        "    return nn.Sequential(first, nn.Linear(width, spec.output_size))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelConfig(name="factory_pkg.models:build", options={"width": 6}), SPEC)
    assert model[0].out_features == 6 and model[1].out_features == 3
    with pytest.raises(ValueError, match=r"cannot import 'no_such_pkg\.models'"):
        build_model(ModelConfig(name="no_such_pkg.models:build"), SPEC)
    with pytest.raises(ValueError, match="has no function 'nope'"):
        build_model(ModelConfig(name="factory_pkg.models:nope"), SPEC)
