"""The rank-side loader on shard files written without Spark."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from lepton_spark.loader import ShardLoader
from lepton_spark.shardio import write_local_split
from lepton_spark.spec import CategoricalFeature, FeatureSpec

SPEC = FeatureSpec(
    numeric=["a", "b"],
    categorical=[CategoricalFeature(name="c", vocabulary=["x", "y", "z"])],
    label="y",
    num_classes=2,
)


def chunked_table(start: int, rows: int, chunk: int) -> pa.Table:
    """Rows numbered from ``start`` (``a`` = row number), in record batches of ``chunk`` rows."""
    ids = np.arange(start, start + rows)
    table = pa.table(
        {
            "a": ids.astype(np.float32),
            "b": (-ids).astype(np.float32),
            "c": ids % 4,
            "y": ids % 2,
        }
    )
    return pa.Table.from_batches(table.to_batches(max_chunksize=chunk))


@pytest.fixture()
def shards(tmp_path):
    tables = [chunked_table(0, 100, 30), chunked_table(100, 70, 25), chunked_table(170, 45, 45)]
    split = write_local_split(tmp_path, "train", tables, SPEC)
    return tmp_path, split


def loader(shards, **kw) -> ShardLoader:
    folder, split = shards
    return ShardLoader(folder, split.shards, n_numeric=2, n_categorical=1, **kw)


def ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b.numeric[:, 0]]


def test_in_order_batches_cover_the_rows_across_record_batch_boundaries(shards):
    batches = list(loader(shards, batch_size=32).epoch(0))
    assert [len(b) for b in batches] == [32] * (215 // 32)
    assert ids(batches) == list(range(32 * (215 // 32)))
    for b in batches:  # columns stay aligned row by row
        torch.testing.assert_close(b.numeric[:, 1], -b.numeric[:, 0])
        assert b.categorical[:, 0].tolist() == [int(v) % 4 for v in b.numeric[:, 0]]
        assert b.label.tolist() == [int(v) % 2 for v in b.numeric[:, 0]]


def test_keeping_the_tail_and_capping_the_steps(shards):
    kept = list(loader(shards, batch_size=32, drop_last=False).epoch(0))
    assert [len(b) for b in kept] == [32] * 6 + [215 - 192]
    assert ids(kept) == list(range(215))
    capped = loader(shards, batch_size=32, steps=4)
    assert len(capped) == 4 and len(list(capped.epoch(0))) == 4


def test_shuffle_is_seeded_per_epoch_and_covers_every_row(shards):
    data = loader(shards, batch_size=20, shuffle=True, seed=5, drop_last=False)
    first, again, second = ids(data.epoch(0)), ids(data.epoch(0)), ids(data.epoch(1))
    assert first == again
    assert first != second
    assert sorted(first) == sorted(second) == list(range(215))
    other_seed = loader(shards, batch_size=20, shuffle=True, seed=6, drop_last=False)
    assert ids(other_seed.epoch(0)) != first


def test_a_batch_inside_one_record_batch_shares_the_mapped_file(shards):
    batches = list(loader(shards, batch_size=10, prefetch=0).epoch(0))
    # Rows 0..29 are one record batch: batches 0, 1 and 2 are views of the same buffer.
    base = batches[0].numeric.untyped_storage().data_ptr()
    assert batches[1].numeric.untyped_storage().data_ptr() == base
    assert batches[2].numeric.untyped_storage().data_ptr() == base
