"""Bad input: each case fails before training with a message naming the culprit, the exit code
for bad input, and nothing left behind (no manifest, no checkpoint, no RUNNING MLflow run)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lepton_spark import events, run_pipeline
from lepton_spark.config import PipelineConfig
from lepton_spark.errors import (
    EXIT_BAD_INPUT,
    EXIT_INFRA,
    InputError,
    RankInputError,
    SlotsError,
    exit_code,
)
from lepton_spark.pipeline.steps import materialize_shards
from lepton_spark.shards.manifest import read_manifest
from tests.helpers import ROOT, store_runs

ROWS = 400


def frame(**changes: list) -> pd.DataFrame:
    """A small clean table (two numeric, one categorical, a string, a 0/1 label), with changes."""
    data = {
        "a": [float(i % 17) for i in range(ROWS)],
        "b": [float((i * 7) % 11) - 5.0 for i in range(ROWS)],
        "c": [f"k{i % 3}" for i in range(ROWS)],
        "s": [f"text{i}" for i in range(ROWS)],
        "y": [int(i % 17 > 8) for i in range(ROWS)],
    }
    for column, values in changes.items():
        data[column] = values + data[column][len(values) :]
    return pd.DataFrame(data)


@pytest.fixture(scope="module")
def sources(spark, tmp_path_factory) -> dict[str, Path]:
    """Parquet folders: a clean one and one per kind of bad value."""
    root = tmp_path_factory.mktemp("bad-input-sources")
    tables = {
        "clean": frame(),
        "nan": frame(b=[1.0, math.nan, 2.0]),
        "inf": frame(a=[math.inf]),
        "null_label": frame(y=[None, 1, 0]),
        "label_range": frame(y=[0, 5, 1]),
    }
    found = {}
    for name, table in tables.items():
        if name == "null_label":
            table["y"] = table["y"].astype("Int64")
        spark.createDataFrame(table).coalesce(2).write.parquet(str(root / name))
        found[name] = root / name
    return found


def pipeline(tmp_path: Path, source: Path, **overrides: object) -> PipelineConfig:
    cfg = PipelineConfig.model_validate(
        {
            "name": "bad-input",
            "sources": {"facts": {"format": "parquet", "path": str(source)}},
            "features": {"numeric": ["a", "b"], "categorical": ["c"], "label": "y"},
            "shards": {"root": str(tmp_path / "shards"), "rows_per_shard": 100},
            "train": {
                "num_workers": 2,
                "epochs": 1,
                "batch_size": 32,
                "checkpoint_root": str(tmp_path / "checkpoints"),
            },
            "tracking": {"local_store": str(tmp_path / "store")},
        }
    )
    return cfg.with_overrides(overrides)


def assert_nothing_left(tmp_path: Path, *, manifests: int = 0) -> None:
    assert len(list((tmp_path / "shards").rglob("manifest.json"))) == manifests
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.rglob("*"))
    runs = store_runs(tmp_path / "store", "bad-input")
    assert all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]


def fails_with(spark, cfg: PipelineConfig, error: type, *names: str) -> BaseException:
    with pytest.raises(error) as failed:
        run_pipeline(cfg, spark=spark, progress=lambda e: None)
    for name in names:
        assert name in str(failed.value), str(failed.value)
    return failed.value


# --- the pipeline file (through the CLI, as a scheduler runs it) ---------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("name: x\nsources: [unclosed\n", "not valid YAML"),
        (
            "name: x\nsources:\n  f: {path: /d}\nfeatures: {label: y}\ntrain: {epochz: 2}\n",
            "train.epochz",
        ),
        (
            "name: x\nsources:\n  f: {path: /d}\nfeatures: {label: y}\ntrain: {epochs: many}\n",
            "train.epochs",
        ),
        (
            "name: x\nsources:\n  f: {path: /d}\nfeatures: {label: y}\n"
            "split: {validation_fraction: 1.5}\n",
            "split.validation_fraction",
        ),
    ],
    ids=["not-yaml", "unknown-key", "wrong-type", "out-of-range"],
)
def test_a_bad_pipeline_file_is_named_with_the_field(tmp_path, text, named, cli):
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(text)
    proc = cli("run", str(pipeline_file), cwd=tmp_path, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert named in proc.stderr and str(pipeline_file) in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.yaml"]  # nothing else written


# --- the data -----------------------------------------------------------------------------


def test_a_missing_source_path_is_named(spark, tmp_path):
    cfg = pipeline(tmp_path, tmp_path / "nowhere")
    err = fails_with(spark, cfg, InputError, str(tmp_path / "nowhere"), "does not exist")
    assert exit_code(err) == EXIT_BAD_INPUT
    assert_nothing_left(tmp_path)


def test_a_feature_column_missing_from_the_data_is_named(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"], **{"features.numeric": ["a", "zz"]})
    fails_with(spark, cfg, InputError, "'zz'")
    assert_nothing_left(tmp_path)


def test_a_feature_column_of_the_wrong_type_is_named(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"], **{"features.numeric": ["a", "s"]})
    fails_with(spark, cfg, InputError, "'s'", "string")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("source", "column"), [("nan", "'b'"), ("inf", "'a'"), ("null_label", "'y'")]
)
def test_bad_values_fail_by_default_naming_the_column_and_rows(
    spark, sources, tmp_path, source, column
):
    cfg = pipeline(tmp_path, sources[source])
    fails_with(spark, cfg, InputError, column, "1 rows", "features.nulls")
    assert_nothing_left(tmp_path)


def test_a_null_label_cannot_be_filled(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["null_label"], **{"features.nulls": "fill"})
    fails_with(spark, cfg, InputError, "label 'y'", "cannot be filled")
    assert_nothing_left(tmp_path)


def test_a_label_outside_the_classes_is_named(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["label_range"], **{"features.num_classes": 2})
    fails_with(spark, cfg, InputError, "label 'y'", "[0, 5]", "outside [0, 2)")
    assert_nothing_left(tmp_path)


def test_an_empty_dataset_is_refused(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"], transform="SELECT * FROM facts WHERE a < 0")
    fails_with(spark, cfg, InputError, "empty")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("transform", [None, "SELECT * FROM facts"], ids=["as-is", "transformed"])
def test_a_csv_source_with_a_header_and_no_rows_is_named(spark, tmp_path, transform):
    csv = tmp_path / "empty.csv"
    csv.write_text("a,b,c,y\n")  # inferSchema reads every column of it as a string
    cfg = pipeline(
        tmp_path,
        csv,
        transform=transform,
        **{
            "sources.facts.format": "csv",
            "sources.facts.options": {"header": "true", "inferSchema": "true"},
        },
    )
    err = fails_with(spark, cfg, InputError, f"source 'facts': path {csv} has no rows")
    assert "Spark type" not in str(err)
    assert exit_code(err) == EXIT_BAD_INPUT
    assert_nothing_left(tmp_path)


def test_fewer_training_rows_than_ranks_is_refused_and_its_shards_removed(spark, sources, tmp_path):
    cfg = pipeline(
        tmp_path,
        sources["clean"],
        transform="SELECT * FROM facts WHERE s = 'text0'",
        **{"split.validation_fraction": 0.01},
    )
    fails_with(spark, cfg, InputError, "training rows for train.num_workers=2")
    assert_nothing_left(tmp_path)


def test_a_batch_larger_than_a_rank_s_rows_is_refused(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"], **{"train.batch_size": 1000})
    fails_with(spark, cfg, InputError, "train.batch_size=1000", "no full step")
    assert_nothing_left(tmp_path)


def test_bad_values_dropped_are_counted_in_mlflow(spark, sources, tmp_path, horovod):
    cfg = pipeline(tmp_path, sources["nan"], **{"features.nulls": "drop"})
    result = run_pipeline(cfg, spark=spark, progress=lambda e: None)
    metrics = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["data/rows_dropped"] == 1 and metrics["data/bad_values.b"] == 1
    assert result.rows["train"] + result.rows["validation"] == ROWS - 1


# --- the shards ---------------------------------------------------------------------------


def committed_shard(spark, cfg: PipelineConfig) -> Path:
    shard_set = materialize_shards(spark, cfg)
    return Path(shard_set.folder) / shard_set.manifest.split("train").shards[0].path


def test_a_corrupted_shard_fails_before_training_without_a_retry(spark, sources, tmp_path, horovod):
    cfg = pipeline(tmp_path, sources["clean"])
    shard = committed_shard(spark, cfg)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum tells
    shard.write_bytes(bytes(data))
    seen: list[events.Event] = []
    with pytest.raises(RankInputError) as failed:
        run_pipeline(cfg, spark=spark, progress=seen.append)
    assert shard.name in str(failed.value) and "sha256" in str(failed.value)
    assert exit_code(failed.value) == EXIT_BAD_INPUT
    assert not [e for e in seen if isinstance(e, events.Retry | events.Start)]  # no training
    assert_nothing_left(tmp_path, manifests=1)  # the committed folder, as it was


def test_a_truncated_shard_is_named_before_the_stage(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"])
    shard = committed_shard(spark, cfg)
    shard.write_bytes(shard.read_bytes()[:-100])
    fails_with(spark, cfg, InputError, shard.name, "bytes on disk", "--rebuild-shards")
    assert_nothing_left(tmp_path, manifests=1)


def test_a_manifest_that_lists_a_missing_file_is_named(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"])
    shard = committed_shard(spark, cfg)
    shard.unlink()
    fails_with(spark, cfg, InputError, shard.name, "missing")
    assert read_manifest(shard.parent.parent.parent)  # left as it was, for a person to look at


# --- the cluster ----------------------------------------------------------------------------


@pytest.mark.connect
def test_more_ranks_than_slots_fails_at_once_with_what_is_there(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"], **{"train.num_workers": 3})
    err = fails_with(spark, cfg, SlotsError, "train.num_workers=3", "has 2")
    assert exit_code(err) == EXIT_INFRA
    assert not (tmp_path / "shards").exists()  # checked before the ETL
    assert_nothing_left(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_cuda_without_a_gpu_fails_at_once(spark, sources, tmp_path):
    cfg = pipeline(tmp_path, sources["clean"], **{"train.device": "cuda"})
    fails_with(spark, cfg, SlotsError, "train.device is 'cuda'", "no CUDA device")
    assert_nothing_left(tmp_path)


def test_a_run_key_with_quotes_is_refused(tmp_path):
    cfg = pipeline(tmp_path, tmp_path)
    with pytest.raises(InputError, match="--run-key"):
        run_pipeline(cfg, run_key="x' OR '1'='1")


def test_the_cli_maps_bad_data_to_exit_code_2(tmp_path, cli):
    proc = cli(
        "run",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--master",
        "local[1]",
        "--num-workers",
        "1",
        "--set",
        "sources.events.generate.rows=2000",
        "--set",
        "features.label=nope",  # a column the generator does not make
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "'nope'" in proc.stderr


def test_the_cli_shows_a_missing_view_once(tmp_path, cli):
    proc = cli(
        "run",
        str(ROOT / "pipelines" / "tabular_demo.yaml"),
        "--master",
        "local[1]",
        "--num-workers",
        "1",
        "--set",
        "sources.events.generate.rows=2000",
        "--set",
        "transform=SELECT * FROM nowhere",  # no source is called that
        cwd=tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_BAD_INPUT, out[-2000:]
    errors = [line for line in out.splitlines() if "TABLE_OR_VIEW_NOT_FOUND" in line]
    assert len(errors) == 1 and errors[0].startswith("error: transform: "), errors
    assert "SQLQueryContextLogger" not in out and "Traceback" not in out
