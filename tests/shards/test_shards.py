"""Spark writes Arrow shards; they read back exactly, and the manifest tells the truth."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from lepton_spark.config import FeatureSpecConfig, ShardConfig
from lepton_spark.data.features import build_features
from lepton_spark.errors import DataError, ShardError
from lepton_spark.shards.deal import BLOCK_ROWS
from lepton_spark.shards.loader import Layout, ShardLoader, record_batches
from lepton_spark.shards.manifest import read_manifest, sha256_file, verify_shard
from lepton_spark.shards.writer import write_shards

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


def write(df, spec, folder, workers=2, rows_per_shard=1_000, **shard_cfg):
    cfg = ShardConfig(rows_per_shard=rows_per_shard, **shard_cfg)
    return write_shards(
        {"train": df},
        spec,
        str(folder),
        cfg,
        num_workers=workers,
        estimated_rows={"train": 5_003},
        fingerprint="fp",
    )


def read_rows(folder, split) -> pd.DataFrame:
    return pd.concat([shard_rows(folder, shard) for shard in split.shards], ignore_index=True)


def shard_rows(folder, shard) -> pd.DataFrame:
    parts = []
    for batch in record_batches(Path(folder) / shard.path, Layout(2, 1)):
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
    shard_set = write(features, spec, tmp_path / "fp")
    split = shard_set.manifest.split("train")
    # No exchange: each of the 3 partitions is written where it is, a new file every 1,000 rows.
    assert split.deal == "blocks" and shard_set.manifest.format_version == 3
    assert len(split.shards) == 6 and max(s.rows for s in split.shards) <= 1_000
    assert split.rows == rows == sum(s.rows for s in split.shards)
    for shard in split.shards:  # the manifest lists every record batch, each of <= 1024 rows
        assert sum(shard.batches) == shard.rows and max(shard.batches) <= BLOCK_ROWS

    expected = features.toPandas().astype({"a": "float32", "b": "float32"})
    got = read_rows(shard_set.folder, split)
    pd.testing.assert_frame_equal(sort_rows(got), sort_rows(expected), check_dtype=False)
    assert set(got["color"]) == {0, 1, 2, 3}  # the nulls became index 0

    for shard in split.shards:
        path = Path(shard_set.folder) / shard.path
        assert path.stat().st_size == shard.bytes
        assert sha256_file(path) == shard.sha256
    # The reader deals the rows out evenly: every rank the same rows, whatever the file sizes.
    assert split.rows_per_rank(2) == [2_501, 2_501]


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_shards_read_back_the_same_rows_in_fewer_bytes(table, tmp_path, compression):
    features, spec, _ = build_features(table, SPEC)
    plain = write(features, spec, tmp_path / "plain")
    packed = write(features, spec, tmp_path / compression, compression=compression)
    assert packed.manifest.compression == compression and plain.manifest.compression == "none"
    for name in ("train",):
        split, plain_split = packed.manifest.split(name), plain.manifest.split(name)
        got = read_rows(packed.folder, split)
        pd.testing.assert_frame_equal(
            sort_rows(got), sort_rows(read_rows(plain.folder, plain_split))
        )
        for shard in split.shards:  # checksums are of the bytes on disk, as for plain shards
            verify_shard(packed.folder, shard)
        assert sum(s.bytes for s in split.shards) < 0.9 * sum(s.bytes for s in plain_split.shards)


def test_every_hash_shard_goes_to_exactly_one_rank(table, tmp_path):
    features, spec, rows = build_features(table, SPEC)
    written = write(
        features, spec, tmp_path / "fp", rows_per_shard=700, strategy="hash", key="color"
    )
    split = written.manifest.split("train")
    assert split.deal == "shards"
    for size in (1, 2, 3, 4):
        assigned = [s.path for r in range(size) for s in split.for_rank(r, size)]
        assert sorted(assigned) == sorted(s.path for s in split.shards)
        assert len(set(assigned)) == len(assigned)
        per_rank = split.rows_per_rank(size)
        assert sum(per_rank) == rows
        assert split.steps_per_epoch(size, 100) == min(per_rank) // 100


def test_a_failed_write_leaves_no_folder_behind(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    boom = F.udf(lambda v: 1 // 0 if v > 2.5 else v, "double")
    broken = features.withColumn("a", boom("a"))
    with pytest.raises(Exception, match="ZeroDivisionError"):
        write(broken, spec, tmp_path / "fp")
    assert list(tmp_path.iterdir()) == []


def test_a_committed_folder_is_replaced_only_by_a_whole_one(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    first = write(features, spec, tmp_path / "fp")
    boom = F.udf(lambda v: 1 // 0 if v > 2.5 else v, "double")
    with pytest.raises(Exception, match="ZeroDivisionError"):
        write(features.withColumn("a", boom("a")), spec, tmp_path / "fp")
    assert [p.name for p in tmp_path.iterdir()] == ["fp"]
    assert read_manifest(tmp_path / "fp") == first.manifest
    attempts = [p.name for p in (tmp_path / "fp").iterdir() if p.is_dir()]
    assert attempts == [first.manifest.split("train").shards[0].path.split("/")[0]]
    # A complete rewrite replaces the old attempt.
    second = write(features, spec, tmp_path / "fp")
    assert read_manifest(tmp_path / "fp") == second.manifest
    assert [p.name for p in (tmp_path / "fp").iterdir() if p.is_dir()] == [
        second.manifest.split("train").shards[0].path.split("/")[0]
    ]


def test_a_corrupted_or_truncated_shard_is_refused(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    shard_set = write(features, spec, tmp_path / "fp")
    first, second = shard_set.manifest.split("train").shards[:2]
    path = Path(shard_set.folder) / first.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        verify_shard(shard_set.folder, first)
    other = Path(shard_set.folder) / second.path
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


def test_random_strategy_is_seeded_and_mixes_rows_inside_files(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    one = write(features, spec, tmp_path / "one", seed=1).manifest.split("train")
    again = write(features, spec, tmp_path / "again", seed=1).manifest.split("train")
    other = write(features, spec, tmp_path / "other", seed=2).manifest.split("train")
    # No exchange: a file holds its partition's rows whatever the seed; the seed orders them.
    for a, b, c in zip(one.shards, again.shards, other.shards, strict=True):
        first = shard_rows(tmp_path / "one", a)
        pd.testing.assert_frame_equal(first, shard_rows(tmp_path / "again", b))
        reseeded = shard_rows(tmp_path / "other", c)
        pd.testing.assert_frame_equal(sort_rows(first), sort_rows(reseeded))
        assert not first.equals(reseeded)
    # Rows inside a file are in random order, even from a split: randomSplit sorts each
    # partition by value, so without mixing a file would hold runs sorted by `a`.
    train, _ = features.repartition(1).randomSplit([0.9, 0.1], seed=3)
    split = write(train, spec, tmp_path / "split", seed=1, rows_per_shard=10_000)
    rows = read_rows(tmp_path / "split", split.manifest.split("train"))["a"]
    assert abs(np.corrcoef(np.arange(len(rows)), rows.rank())[0, 1]) < 0.2


def test_hash_strategy_keeps_every_key_in_one_shard(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    shard_set = write(features, spec, tmp_path / "fp", strategy="hash", key="b")
    split = shard_set.manifest.split("train")
    owner: dict[float, int] = {}
    for i, shard in enumerate(split.shards):
        for key in set(shard_rows(shard_set.folder, shard)["b"]):
            assert owner.setdefault(key, i) == i, f"key {key} in shards {owner[key]} and {i}"
    assert len(owner) == 100
    assert shard_set.manifest.strategy == "hash" and shard_set.manifest.key == "b"
    skew = shard_set.manifest.skew["train"]
    assert sum(skew.rows_per_rank) == split.rows == 5_003
    assert skew.rank_max_over_mean == pytest.approx(max(skew.rows_per_rank) / (5_003 / 2), 1e-3)


def test_range_strategy_gives_ordered_non_overlapping_shards(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    shard_set = write(features, spec, tmp_path / "fp", strategy="range", key="a")
    shards = shard_set.manifest.split("train").shards
    assert len(shards) == 6
    for shard in shards:
        values = shard_rows(shard_set.folder, shard)["a"]
        assert values.is_monotonic_increasing  # sorted by the key within the shard
        assert (values.min(), values.max()) == pytest.approx((shard.key_min, shard.key_max))
    for left, right in itertools.pairwise(shards):
        assert left.key_max <= right.key_min
    sizes = [s.rows for s in shards]
    assert max(sizes) < 2 * min(sizes)  # range bounds come from a sample: roughly even


def test_skew_is_reported_and_ranks_balanced_by_rows(spark, tmp_path):
    # One key holds 70% of the rows: that shard alone outweighs the rest.
    df = spark.range(4_000).selectExpr(
        "CAST(id AS DOUBLE) AS a",
        "CAST(id % 7 AS DOUBLE) AS b",
        "'x' AS color",
        "IF(id < 2800, 0, id % 50 + 1) AS user",
        "CAST(id % 3 AS LONG) AS y",
    )
    features, spec, _ = build_features(df, SPEC, keep=("user",))
    shard_set = write(
        features, spec, tmp_path / "fp", workers=2, rows_per_shard=500, strategy="hash", key="user"
    )
    split = shard_set.manifest.split("train")
    skew = shard_set.manifest.skew["train"]
    assert max(skew.rows_per_shard) >= 2_800
    assert skew.rank_max_over_mean >= 1.4
    # The big shard gets a rank to itself; every other shard goes to the other rank.
    big = max(split.shards, key=lambda s: s.rows)
    assert split.assignment(2)[0] == [big] or split.assignment(2)[1] == [big]


def test_shards_go_through_pyarrow_fs_uris(table, tmp_path):
    features, spec, _ = build_features(table, SPEC)
    uri = (tmp_path / "fp").as_uri()  # file:///...
    shard_set = write(features, spec, uri)
    # A file:// URI lands on the local disk, where the loader memory-maps the shards.
    assert shard_set.folder == str(tmp_path / "fp")
    assert (tmp_path / "fp" / "manifest.json").is_file()
    assert read_manifest(uri) == shard_set.manifest
    split = shard_set.manifest.split("train")
    loader = ShardLoader(uri, split.shards, layout=Layout(2, 1), batch_size=1_000, drop_last=False)
    assert sum(len(b) for b in loader.epoch(0)) == 5_003


def test_bad_values_fail_or_are_dropped_or_filled_as_configured(spark):
    df = spark.createDataFrame(
        [(1.0, 0), (float("nan"), 1), (float("inf"), 0), (4.0, None), (5.0, 1)],
        "a double, y long",
    )
    with pytest.raises(DataError, match=r"features\.nulls"):
        build_features(df, FeatureSpecConfig(numeric=["a"], label="y"))

    quality: dict[str, int] = {}
    dropped, _, rows = build_features(
        df, FeatureSpecConfig(numeric=["a"], label="y", nulls="drop"), quality=quality
    )
    assert rows == 2 == dropped.count()
    assert sorted(r["a"] for r in dropped.collect()) == [1.0, 5.0]
    assert quality == {"bad_values.a": 2, "bad_values.y": 1, "rows_dropped": 3, "rows_filled": 0}

    with pytest.raises(DataError, match="label 'y' is null in 1 rows"):
        build_features(df, FeatureSpecConfig(numeric=["a"], label="y", nulls="fill"))
    no_null_label = df.where("y IS NOT NULL")
    quality = {}
    filled, _, rows = build_features(
        no_null_label,
        FeatureSpecConfig(numeric=["a"], label="y", nulls="fill", fill_value=-1.0),
        quality=quality,
    )
    assert rows == 4
    assert sorted(r["a"] for r in filled.collect()) == [-1.0, -1.0, 1.0, 5.0]
    assert quality["rows_filled"] == 2 and quality["rows_dropped"] == 0


def test_arrays_text_and_weights_are_checked_cleaned_and_tokenised_like_serving(spark):
    from lepton_spark.serving.preprocess import token_ids

    df = spark.createDataFrame(
        [
            ([1.0, 2.0], "A good film, GOOD!", 1.0, 0),
            (None, "bad", 1.0, 1),
            ([1.0, float("nan")], None, 2.0, 1),
            ([3.0, 4.0], None, 0.5, 0),
            ([5.0, 6.0], "bad film", -1.0, 1),
        ],
        "v array<double>, t string, w double, y long",
    )
    cfg = dict(
        arrays=[{"name": "v"}],
        text=[{"name": "t", "max_length": 4}],
        weight="w",
        label="y",
        num_classes=2,
    )
    with pytest.raises(DataError, match=r"'w': 1 rows, 'v': 2 rows \(a negative weight"):
        build_features(df, FeatureSpecConfig(**cfg))
    features, spec, rows = build_features(df, FeatureSpecConfig(**cfg, nulls="drop"))
    assert rows == 2 and spec.arrays[0].shape == [2] and spec.weight == "w"
    text = spec.texts[0]
    # Counted over the rows kept: good ×2, a, film ×1 (ties by word).
    assert text.vocabulary == ["good", "a", "film"]
    got = features.orderBy("w").collect()
    assert [r["v"] for r in got] == [[3.0, 4.0], [1.0, 2.0]]
    ids = token_ids(
        ["", "A good film, GOOD!"], {w: i + 2 for i, w in enumerate(text.vocabulary)}, 4
    )
    assert [r["t"] for r in got] == ids.tolist() == [[0, 0, 0, 0], [3, 2, 4, 2]]

    uneven = spark.createDataFrame([([1.0], 0), ([1.0, 2.0], 1)], "v array<double>, y long")
    with pytest.raises(DataError, match=r"rows of 1\.\.2 values"):
        build_features(uneven, FeatureSpecConfig(arrays=[{"name": "v"}], label="y"))
    floats = spark.createDataFrame([(1.0, 2.5, 0)], "a double, code double, y long")
    with pytest.raises(DataError, match="cast it in the transform"):
        build_features(floats, FeatureSpecConfig(numeric=["a"], categorical=["code"], label="y"))
