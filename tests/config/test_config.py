import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from lepton_spark.config import (
    ConfigError,
    PipelineConfig,
    TrainConfig,
    load_config,
    parse_override,
)

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
        ({"train.backend": "mpi"}, "train.backend"),
        (
            {
                "features.task": "clustering",
                "features.label": None,
                "features.num_classes": None,
                "features.categorical": [],
                "model.name": "kmeans",
                "train.backend": "fsdp",
            },
            "train.backend 'fsdp' shards a model's parameters and k-means has none",
        ),
        ({"train.min_workers": 3}, "train.min_workers (3) is more than train.num_workers (2)"),
        (
            {"train.backend": "fsdp", "train.compression": "fp16"},
            "train.compression does not apply to train.backend 'fsdp'",
        ),
        ({"train.compression": "bf16"}, "Horovod compresses to fp16 only"),
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
        "text_fsdp",
        "text_transformer",
    ]
    for name in names:
        load_config(ROOT / "pipelines" / f"{name}.yaml")
    with pytest.raises(ConfigError, match=r"baseline\.mllib trains Spark MLlib"):
        load_config(ROOT / "pipelines" / "digits_cnn.yaml", {"baseline.mllib": True})


def test_the_fsdp_template_is_a_model_worth_sharding():
    """pipelines/text_fsdp.yaml: a 20-50 M parameter encoder, trained with fsdp."""
    from lepton_spark.models import build_model
    from lepton_spark.spec import FeatureSpec, TextFeature

    cfg = load_config(ROOT / "pipelines" / "text_fsdp.yaml")
    assert cfg.train.backend == "fsdp"
    words = [f"w{i}" for i in range(cfg.features.text[0].max_vocabulary)]
    spec = FeatureSpec(
        numeric=[],
        categorical=[],
        texts=[TextFeature(name="text", vocabulary=words, max_length=40)],
        label="label",
        num_classes=4,
    )
    model = build_model(cfg.model, spec)
    parameters = sum(p.numel() for p in model.parameters())
    assert 20e6 <= parameters <= 50e6, parameters


def test_the_engine_fields_at_their_defaults_keep_a_run_keys_fingerprint():
    """Fields added with the engines leave the fingerprint of a config that does not use them
    as it was (an unfinished run keyed by 0.2 still resumes); using them makes a new one."""
    cfg = load_config(ROOT / "pipelines" / "tabular_demo.yaml")
    fingerprint = cfg.training_fingerprint()
    for field, value in TrainConfig.ADDED_DEFAULTS.items():
        assert cfg.with_overrides({f"train.{field}": value}).training_fingerprint() == fingerprint
    for changed in ({"train.backend": "ddp"}, {"train.accumulate_steps": 2}):
        assert cfg.with_overrides(changed).training_fingerprint() != fingerprint


def test_the_demos_run_key_fingerprint_is_what_earlier_versions_computed():
    """Pinned: a field added to the config must leave this hash as it was at its default (an
    unfinished keyed run of an earlier version resumes). c3590783a678f1cd is what 0.2.0 (before
    ``shards.compression``) computed; how the shards are stored does not change it at all."""
    cfg = load_config(ROOT / "pipelines" / "tabular_demo.yaml")
    assert cfg.training_fingerprint() == "c3590783a678f1cd"
    zstd = cfg.with_overrides({"shards.compression": "zstd"})
    assert zstd.training_fingerprint() == "c3590783a678f1cd"


def test_standardize_left_out_follows_the_model_and_is_in_the_params():
    demo = load_config(DEMO, {"features.standardize": None})
    assert demo.features.standardize is True  # mlp
    assert demo.flat()["features.standardize"] == "true"
    linear = demo.with_overrides({"model.name": "linear", "features.standardize": None})
    assert linear.features.standardize is False
    assert linear.flat()["features.standardize"] == "false"
    kmeans = load_config(ROOT / "pipelines" / "kmeans_blobs.yaml")
    assert kmeans.features.standardize is False
    assert demo.with_overrides({"features.standardize": False}).features.standardize is False
