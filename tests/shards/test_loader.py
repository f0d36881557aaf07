"""The rank-side loader on shard files written without Spark."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pyarrow.fs import LocalFileSystem

from lepton_spark.shards.loader import Layout, ShardLoader, record_batches
from lepton_spark.shards.local import write_local_shards
from lepton_spark.shards.storage import Location
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
    manifest = write_local_shards(tmp_path, {"train": tables}, SPEC)
    return tmp_path, manifest.split("train")


def loader(shards, **kw) -> ShardLoader:
    folder, split = shards
    return ShardLoader(folder, split.shards, layout=Layout(2, 1), **kw)


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


def shard_of(row_id: int) -> int:
    return 0 if row_id < 100 else 1 if row_id < 170 else 2


def test_the_shuffle_buffer_mixes_rows_across_shards(shards):
    data = loader(shards, batch_size=50, shuffle=True, seed=1, shuffle_buffer=215)
    first = next(iter(data.epoch(0)))
    assert len({shard_of(int(v)) for v in first.numeric[:, 0]}) > 1
    # With a buffer of one record batch, rows mix only inside it.
    small = loader(shards, batch_size=20, shuffle=True, seed=1, shuffle_buffer=1, prefetch=0)
    for batch in small.epoch(0):
        assert len({shard_of(int(v)) for v in batch.numeric[:, 0]}) <= 2


def test_pad_tail_wraps_around_to_reach_the_steps(shards):
    # 215 rows, batch 32: 7 steps need 224 rows, so 9 rows come round again.
    padded = loader(shards, batch_size=32, steps=7, tail="pad", shuffle=True, seed=3)
    batches = list(padded.epoch(0))
    assert [len(b) for b in batches] == [32] * 7
    seen = ids(batches)
    assert set(seen) == set(range(215)) and len(seen) == 224
    with pytest.raises(ValueError, match="needs the number of steps"):
        loader(shards, batch_size=32, tail="pad")


def test_three_shards_over_two_ranks_give_equal_steps_with_either_tail(shards):
    folder, split = shards  # 100, 70 and 45 rows: rank 0 gets 100, rank 1 gets 70 + 45
    assert split.rows_per_rank(2) == [100, 115]
    for tail, steps in (("drop", 100 // 16), ("pad", -(-115 // 16))):
        assert split.steps_per_epoch(2, 16, tail) == steps
        counts = []
        for rank in range(2):
            data = ShardLoader(
                folder,
                split.for_rank(rank, 2),
                layout=Layout(2, 1),
                batch_size=16,
                steps=steps,
                tail=tail,
                shuffle=True,
            )
            counts.append([len(b) for b in data.epoch(1)])
        assert counts[0] == counts[1] == [16] * steps


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is memory-mapped in this process (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_numeric_tensors_are_the_mapped_file_itself(shards):
    folder, split = shards
    place = (Path(folder) / split.shards[0].path).resolve()
    batch = next(record_batches(place, Layout(2, 1)))
    # No copy: each tensor's data lies inside the shard file's memory mapping.
    for tensor in batch.tensors():
        address = tensor.data_ptr()
        assert any(start <= address < end for start, end in mapped_ranges(place)), tensor


def test_stopping_early_stops_the_prefetch_thread_at_once(shards):
    data = loader(shards, batch_size=10, prefetch=1, shuffle=True, shuffle_buffer=1)
    batches = data.epoch(0)
    next(batches)
    started = time.perf_counter()
    batches.close()  # the consumer stops while the producer waits on a full queue
    assert time.perf_counter() - started < 4.0  # not the 5 s the close would wait at most
    assert not [t for t in threading.enumerate() if t.name == "lepton-prefetch"]


def test_a_uri_keeps_its_query_when_joined():
    place = Location(LocalFileSystem(), "/b/shards", "s3://b/shards?endpoint_override=h:9000")
    child = place.child("run-1", "manifest.json")
    assert child.uri == "s3://b/shards/run-1/manifest.json?endpoint_override=h:9000"
    assert child.path == "/b/shards/run-1/manifest.json"
