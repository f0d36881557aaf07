import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from lepton_spark.config import ConfigError, PipelineConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "tabular_demo.yaml"


def test_demo_pipeline_loads_with_its_documented_defaults():
    cfg = load_config(DEMO)
    assert cfg.name == "tabular-demo"
    assert cfg.sources["events"].generate.rows == 1_000_000
    assert cfg.train.num_workers == 2
    assert cfg.features.categorical == ["cat_a", "cat_b"]
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == "8"


def test_overrides_are_applied_and_validated():
    cfg = load_config(
        DEMO, dict([parse_override("train.epochs=7"), parse_override("train.lr=0.5")])
    )
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.5)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        cfg.with_overrides({"train.epochs": 0})


def test_unknown_key_is_named_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("epochs: 4", "epochs: 4\n  epoch: 5"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value)
    assert "train.epoch" in str(err.value)


def test_invalid_yaml_and_missing_file_are_reported(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_source_needs_exactly_one_kind():
    data = load_config(DEMO).model_dump(mode="json")
    data["sources"]["events"]["path"] = "/data/x.parquet"
    with pytest.raises(ValidationError, match="exactly one"):
        PipelineConfig.model_validate(data)


def test_flat_params_and_fingerprint_are_stable():
    cfg = load_config(DEMO)
    flat = cfg.flat()
    assert flat["train.epochs"] == "4"
    assert flat["model.hidden"] == "[128, 64]"
    assert cfg.fingerprint("sources") == load_config(DEMO).fingerprint("sources")
    assert cfg.fingerprint("train") != cfg.with_overrides({"train.lr": 0.1}).fingerprint("train")


def test_overrides_keep_dotted_spark_conf_keys_whole():
    cfg = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {"spark.conf.spark.sql.shuffle.partitions": 8, "train.epochs": 1},
    )
    assert cfg.spark.conf["spark.sql.shuffle.partitions"] == "8"
    assert cfg.flat()["spark.conf.spark.sql.shuffle.partitions"] == "8"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # k-means: numeric features only, checked before any work
        (
            {
                "features.task": "clustering",
                "features.label": None,
                "features.num_classes": None,
                "model.name": "kmeans",
            },
            "k-means clusters numeric features only",
        ),
        ({"model.name": "kmeans"}, "clustering pipelines use model 'kmeans'"),
        (
            {
                "features.task": "regression",
                "features.num_classes": None,
                "compress.quantize": True,
            },
            "classification models only",
        ),
        (
            {"model.name": "transformer", "compress.quantize": True},
            "compress.quantize does not apply to model 'transformer'",
        ),
        ({"model.name": "not a model"}, "unknown model 'not a model'"),
        ({"features.task": "regression"}, "num_classes is for classification"),
    ],
)
def test_model_task_and_feature_mismatches_are_refused_before_any_work(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(ROOT / "pipelines" / "tabular_demo.yaml", overrides)


def test_every_template_loads():
    names = sorted(p.stem for p in (ROOT / "pipelines").glob("*.yaml"))
    assert names == [
        "digits_cnn",
        "kmeans_blobs",
        "tabular_demo",
        "tabular_logistic",
        "tabular_regression",
        "text_transformer",
    ]
    for name in names:
        load_config(ROOT / "pipelines" / f"{name}.yaml")
    with pytest.raises(ConfigError, match=r"baseline\.mllib trains Spark MLlib"):
        load_config(ROOT / "pipelines" / "digits_cnn.yaml", {"baseline.mllib": True})
