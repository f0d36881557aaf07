"""Spark writes Arrow shards; they read back exactly, and the manifest tells the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from lepton_spark.config import FeatureSpecConfig
from lepton_spark.etl import DataError, build_features
from lepton_spark.loader import record_batches
from lepton_spark.manifest import ShardError, read_manifest, sha256_file, verify_shard
from lepton_spark.shards import num_shards, write_shards

SPEC = FeatureSpecConfig(numeric=["a", "b"], categorical=["color"], label="y", num_classes=3)


@pytest.fixture(scope="module")
def table(spark):
    rng = np.random.default_rng(3)
    n = 5_003  # not a multiple of anything
    pdf = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.integers(-50, 50, size=n),
            "color": rng.choice(["red", "green", "blue", None], size=n, p=[0.5, 0.3, 0.15, 0.05]),
            "y": rng.integers(0, 3, size=n),
        }
    )
    return spark.createDataFrame(pdf).repartition(3)


def read_rows(folder: Path, split) -> pd.DataFrame:
    parts = []
    for shard in split.shards:
        for batch in record_batches(folder / shard.path, n_numeric=2, n_categorical=1):
            assert batch.numeric.dtype.is_floating_point and batch.numeric.dtype.itemsize == 4
            assert str(batch.categorical.dtype) == "torch.int64"
            assert str(batch.label.dtype) == "torch.int64"
            parts.append(
                pd.DataFrame(
                    {
                        "a": batch.numeric[:, 0].numpy(),
                        "b": batch.numeric[:, 1].numpy(),
                        "color": batch.categorical[:, 0].numpy(),
                        "y": batch.label.numpy(),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_shards_round_trip_rows_values_and_dtypes(table, tmp_path):
    features, spec, rows = build_features(table, SPEC)
    assert rows == 5_003
    # Categories by frequency; index 0 is reserved for null/unknown.
    assert spec.categorical[0].vocabulary == ["red", "green", "blue"]
    shard_set = write_shards(
        {"train": features},
        spec,
        root=tmp_path,
        fingerprint="fp",
        num_workers=2,
        rows_per_shard=1_000,
        estimated_rows={"train": rows},
    )
    split = shard_set.manifest.split("train")
    assert len(split.shards) == num_shards(rows, 2, 1_000) == 6
    assert split.rows == rows == sum(s.rows for s in split.shards)

    expected = features.toPandas().astype({"a": "float32", "b": "float32"})
    got = read_rows(shard_set.folder, split)
    pd.testing.assert_frame_equal(sort_rows(got), sort_rows(expected), check_dtype=False)
    assert set(got["color"]) == {0, 1, 2, 3}  # the nulls became index 0

    for shard in split.shards:
        path = shard_set.folder / shard.path
        assert path.stat().st_size == shard.bytes
        assert sha256_file(path) == shard.sha256
    # Round-robin repartitioning keeps shards balanced.
    sizes = [s.rows for s in split.shards]
    assert max(sizes) - min(sizes) <= 3


def test_every_shard_goes_to_exactly_one_rank(table, tmp_path):
    features, spec, rows = build_features(table, SPEC)
    split = write_shards(
        {"train": features}, spec, tmp_path, "fp", 2, 700, {"train": rows}
    ).manifest.split("train")
    for size in (1, 2, 3, 4):
        assigned = [s.path for r in range(size) for s in split.for_rank(r, size)]
        assert sorted(assigned) == sorted(s.path for s in split.shards)
        assert len(set(assigned)) == len(assigned)
        per_rank = split.rows_per_rank(size)
        assert sum(per_rank) == rows
        assert split.steps_per_epoch(size, 100) == min(per_rank) // 100


def test_a_failed_write_leaves_no_folder_behind(table, tmp_path):
    features, spec, rows = build_features(table, SPEC)
    boom = F.udf(lambda v: 1 // 0 if v > 2.5 else v, "double")
    broken = features.withColumn("a", boom("a"))
    with pytest.raises(Exception, match="ZeroDivisionError"):
        write_shards({"train": broken}, spec, tmp_path, "fp", 2, 1_000, {"train": rows})
    assert list(tmp_path.iterdir()) == []


def test_a_committed_folder_is_replaced_only_by_a_whole_one(table, tmp_path):
    features, spec, rows = build_features(table, SPEC)
    first = write_shards({"train": features}, spec, tmp_path, "fp", 2, 1_000, {"train": rows})
    created = first.manifest.created_at
    boom = F.udf(lambda v: 1 // 0 if v > 2.5 else v, "double")
    with pytest.raises(Exception, match="ZeroDivisionError"):
        write_shards(
            {"train": features.withColumn("a", boom("a"))},
            spec,
            tmp_path,
            "fp",
            2,
            1_000,
            {"train": rows},
        )
    assert [p.name for p in tmp_path.iterdir()] == ["fp"]
    assert read_manifest(tmp_path / "fp").created_at == created


def test_a_corrupted_or_truncated_shard_is_refused(table, tmp_path):
    features, spec, rows = build_features(table, SPEC)
    shard_set = write_shards({"train": features}, spec, tmp_path, "fp", 2, 1_000, {"train": rows})
    first, second = shard_set.manifest.split("train").shards[:2]
    path = shard_set.folder / first.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        verify_shard(shard_set.folder, first)
    other = shard_set.folder / second.path
    other.write_bytes(other.read_bytes()[:-10])
    with pytest.raises(ShardError, match="bytes on disk"):
        verify_shard(shard_set.folder, second)


def test_bad_columns_are_named_before_anything_is_written(spark):
    df = spark.createDataFrame([(1.0, "x", 0), (2.0, "y", 5)], "a double, c string, y long")
    with pytest.raises(DataError, match=r"\['missing'\]"):
        build_features(df, FeatureSpecConfig(numeric=["a", "missing"], label="y"))
    with pytest.raises(DataError, match="numeric feature 'c'"):
        build_features(df, FeatureSpecConfig(numeric=["c"], label="y"))
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        build_features(df, FeatureSpecConfig(numeric=["a"], label="y", num_classes=2))
    with_nan = spark.createDataFrame([(float("nan"), 0), (1.0, 1)], "a double, y long")
    with pytest.raises(DataError, match="'a': 1 rows"):
        build_features(with_nan, FeatureSpecConfig(numeric=["a"], label="y"))
