"""The estimator's params are the pipeline config's fields: same names, same validation."""

from __future__ import annotations

import pytest

from lepton_spark import TorchEstimator
from lepton_spark.config import PipelineConfig
from lepton_spark.errors import ConfigError
from lepton_spark.ml.params import FIELDS


def test_every_field_is_a_param_with_the_config_s_default_and_doc():
    est = TorchEstimator()
    defaults = PipelineConfig.model_validate(
        {
            "name": "d",
            "sources": {"s": {"table": "t"}},
            "features": {"label": "y", "numeric": ["a"]},
        }
    ).model_dump(mode="json")
    for name, (section, field) in FIELDS.items():
        param = est.getParam(name)
        assert f"config: {section}.{field}" in param.doc
        if (section, field) == ("features", "standardize"):  # unset: follows the model
            assert est.getOrDefault(param) is None and defaults[section][field] is True
        elif (section, field) != ("features", "numeric"):  # the one field a config must set
            assert est.getOrDefault(param) == defaults[section][field], name
    assert est.getOrDefault("lr") == 1e-3 and est.getOrDefault("epochs") == 3
    assert est.getOrDefault("model") == "mlp" and est.getOrDefault("split_seed") == 42
    assert {"featuresCol", "labelCol", "weightCol", "predictionCol"} <= {p.name for p in est.params}


@pytest.mark.parametrize(
    ("model", "standardize"),
    [
        ("mlp", True),
        ("cnn", True),
        ("transformer", True),
        ("pkg.mod:build", True),
        ("linear", False),
    ],
)
def test_standardize_left_unset_follows_the_model(model, standardize):
    est = TorchEstimator(numeric=["a"], labelCol="y", model=model)
    assert est.pipeline_config("v").features.standardize is standardize
    assert TorchEstimator(
        numeric=["a"], labelCol="y", model=model, standardize=not standardize
    ).pipeline_config("v").features.standardize is (not standardize)


def test_a_bad_value_fails_when_it_is_set_naming_the_param():
    with pytest.raises(TypeError, match=r'param "epochs".*greater than 0.*train\.epochs'):
        TorchEstimator(epochs=0)
    with pytest.raises(TypeError, match=r'param "optimizer"'):
        TorchEstimator().setParams(optimizer="lbfgs")
    with pytest.raises(TypeError, match="no param 'epoch'"):
        TorchEstimator(epoch=3)


def test_the_params_become_the_pipeline_config():
    est = TorchEstimator(
        numeric=["a"], text=["doc"], labelCol="y", weightCol="w", lr=0.01, split_seed=7
    )
    cfg = est.pipeline_config("lepton_input_x")
    assert cfg.sources["input"].table == "lepton_input_x"
    assert (cfg.features.label, cfg.features.weight) == ("y", "w")
    assert [t.name for t in cfg.features.text] == ["doc"] and cfg.features.arrays == []
    assert (cfg.train.lr, cfg.split.seed) == (0.01, 7)
    vectors = TorchEstimator(labelCol="y").pipeline_config("v")  # nothing named: featuresCol
    assert [a.name for a in vectors.features.arrays] == ["features"]
    both = TorchEstimator(numeric=["a"], featuresCol="vec").pipeline_config("v")
    assert [a.name for a in both.features.arrays] == ["vec"]


def test_a_combination_the_config_refuses_is_told_in_param_names():
    with pytest.raises(ConfigError) as refused:
        TorchEstimator(numeric=["a"], model="kmeans").pipeline_config("v")
    assert "param 'model'" in str(refused.value) and "param 'task'" in str(refused.value)
