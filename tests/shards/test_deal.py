"""Balance and randomness on the reader: the deal of row blocks to ranks, epoch by epoch."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

from lepton_spark.config import ShardConfig
from lepton_spark.shards.deal import BLOCK_ROWS, RowIndex, rank_ranges
from lepton_spark.shards.loader import Layout, ShardLoader, loader_files
from lepton_spark.shards.local import write_local_shards
from lepton_spark.shards.manifest import MANIFEST_NAME, read_manifest
from lepton_spark.shards.writer import write_shards
from lepton_spark.spec import CategoricalFeature, FeatureSpec

SPEC = FeatureSpec(
    numeric=["a", "b"],
    categorical=[CategoricalFeature(name="c", vocabulary=["x", "y", "z"])],
    label="y",
    num_classes=2,
)


def numbered(start: int, rows: int) -> pa.Table:
    """Rows numbered from ``start``: ``a`` is the row's number."""
    ids = np.arange(start, start + rows)
    return pa.table(
        {"a": ids.astype(np.float32), "b": ids % 7, "c": ids % 4, "y": ids % 2},
    )


def blocks_folder(tmp_path, sizes: list[int]):
    tables, start = [], 0
    for n in sizes:
        tables.append(numbered(start, n))
        start += n
    manifest = write_local_shards(tmp_path, {"train": tables}, SPEC, deal="blocks")
    return tmp_path, manifest.split("train")


def rank_loaders(folder, split, size: int, deal_seed: int = 5, **kw) -> list[ShardLoader]:
    loaders = []
    for rank in range(size):
        files, share = loader_files(split, rank, size, seed=deal_seed)
        loaders.append(
            ShardLoader(folder, files, layout=Layout(2, 1), share=share, seed=rank, **kw)
        )
    return loaders


def row_ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b.numeric[:, 0]]


@pytest.mark.parametrize("sizes", [[1, 2], [3], [1_000], [5_003, 17, 400], [40, 0, 3_000, 1]])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_every_rank_gets_the_same_rows_each_epoch_none_twice(tmp_path, sizes, ranks):
    # [1, 2] and [3]: fewer record batches than ranks x 2.
    folder, split = blocks_folder(tmp_path, sizes)
    total = sum(sizes)
    if total < ranks:
        assert split.training_problem(ranks, 1) is not None
        return
    loaders = rank_loaders(folder, split, ranks, batch_size=1, shuffle=True, drop_last=False)
    assert {len(lo) for lo in loaders} == {total // ranks}
    for epoch in (0, 1):
        seen = [row_ids(lo.epoch(epoch)) for lo in loaders]
        assert [len(s) for s in seen] == [total // ranks] * ranks  # equal steps, every rank
        every = [i for s in seen for i in s]
        assert len(set(every)) == len(every) == total - total % ranks  # only the remainder out
        assert set(every) <= set(range(total))
    assert split.steps_per_epoch(ranks, 1) == total // ranks
    # Validation and k-means: every row once over the ranks, remainder included.
    every = []
    for rank in range(ranks):
        files, share = loader_files(split, rank, ranks, seed=5, every_row=True)
        lo = ShardLoader(
            folder, files, layout=Layout(2, 1), share=share, batch_size=64, drop_last=False
        )
        every += row_ids(lo.epoch(3))
        assert len(lo) == -(-share.rows(total) // 64)
    assert sorted(every) == list(range(total))


def test_the_deal_is_seeded_fresh_every_epoch_and_resumes_mid_epoch(tmp_path):
    folder, split = blocks_folder(tmp_path, [3_000, 2_500, 1_111])
    kw = {"batch_size": 50, "shuffle": True, "shuffle_buffer": 700}
    first, again = rank_loaders(folder, split, 2, **kw), rank_loaders(folder, split, 2, **kw)
    other = rank_loaders(folder, split, 2, deal_seed=6, **kw)
    for rank in range(2):
        one = [b.numeric[:, 0].tolist() for b in first[rank].epoch(1)]
        assert one == [b.numeric[:, 0].tolist() for b in again[rank].epoch(1)]  # same seed
        assert one != [b.numeric[:, 0].tolist() for b in other[rank].epoch(1)]
        # Two epochs give a rank different rows (not only another order).
        e0, e1 = set(row_ids(first[rank].epoch(0))), set(row_ids(first[rank].epoch(1)))
        assert len(e0 & e1) < 0.75 * len(e0)
        # A resumed run skips the batches it trained on and sees what the whole one saw.
        resumed = [b.numeric[:, 0].tolist() for b in list(again[rank].epoch(1))[37:]]
        assert resumed == one[37:]


def test_a_padded_tail_fills_the_last_batch_from_a_new_deal(tmp_path):
    folder, split = blocks_folder(tmp_path, [700, 301])  # 500 rows per rank of 2
    steps = split.steps_per_epoch(2, 64, "pad")
    assert steps == 8  # ceil(500 / 64)
    loaders = rank_loaders(folder, split, 2, batch_size=64, shuffle=True, steps=steps, tail="pad")
    for lo in loaders:
        batches = [row_ids([b]) for b in lo.epoch(0)]
        assert [len(b) for b in batches] == [64] * 8
        first_pass = [i for b in batches for i in b][:500]
        assert len(set(first_pass)) == 500  # the whole deal first, then the next turn's rows


def test_row_index_slices_across_record_batches_and_files(tmp_path):
    _, split = blocks_folder(tmp_path, [BLOCK_ROWS + 904, 10, 6_000])
    index = RowIndex(split.shards)
    assert index.rows == BLOCK_ROWS + 6_914
    # Batch 0 of file 0 ends at BLOCK_ROWS, file 0 at BLOCK_ROWS + 904, file 1 ten rows later.
    pieces = list(index.pieces(BLOCK_ROWS - 96, BLOCK_ROWS + 1_004))
    assert [(p.file, p.batch, p.start, p.stop) for p in pieces] == [
        (0, 0, BLOCK_ROWS - 96, BLOCK_ROWS),
        (0, 1, 0, 904),
        (1, 0, 0, 10),
        (2, 0, 0, 90),
    ]
    ranges = rank_ranges(index.rows, 1, 2, seed=0, epoch=0)
    assert sum(b - a for a, b in ranges) == index.rows // 2


@pytest.fixture(scope="module")
def sorted_sources(spark):
    """40,000 rows sorted by the label, and the same rows sorted by a feature the label follows."""
    rng = np.random.default_rng(8)
    n = 40_000
    a = rng.normal(size=n)
    y = (a + rng.normal(scale=0.8, size=n) > 0.4).astype(int)  # about 35% ones
    import pandas as pd

    # The columns as feature preparation leaves them (category indices): nothing reorders rows.
    pdf = pd.DataFrame({"a": a, "b": np.arange(n, dtype=float), "color": 1, "y": y})
    df = spark.createDataFrame(pdf)
    return {"label": df.orderBy("y", "b"), "feature": df.orderBy("a")}


@pytest.mark.parametrize("order", ["label", "feature"])
def test_a_sorted_source_gives_every_rank_the_global_label_mix(sorted_sources, tmp_path, order):
    features, rows = sorted_sources[order], 40_000
    spec = FeatureSpec(
        numeric=["a", "b"],
        categorical=[CategoricalFeature(name="color", vocabulary=["red"])],
        label="y",
        num_classes=2,
    )
    written = write_shards(
        {"train": features},
        spec,
        str(tmp_path / "fp"),
        ShardConfig(rows_per_shard=6_000),
        num_workers=2,
        estimated_rows={"train": rows},
        fingerprint="fp",
    )
    split = written.manifest.split("train")
    assert split.deal == "blocks"
    labels = np.concatenate(
        [
            np.concatenate(
                [
                    b.label.numpy()
                    for b in ShardLoader(
                        written.folder, [s], layout=Layout(2, 1), batch_size=4096, drop_last=False
                    ).epoch(0)
                ]
            )
            for s in split.shards
        ]
    )
    overall = labels.mean()
    # The files hold the sorted order: without the deal rank 0 would get mostly one label.
    head = labels[: rows // 2].mean()
    assert abs(head - overall) > 0.1
    loaders = []
    for rank in range(2):
        files, share = loader_files(split, rank, 2, seed=11)
        loaders.append(
            ShardLoader(
                written.folder,
                files,
                layout=Layout(2, 1),
                share=share,
                batch_size=64,
                shuffle=True,
                seed=rank,
                steps=split.steps_per_epoch(2, 64),
            )
        )
    assert len(loaders[0]) == len(loaders[1]) == rows // 2 // 64
    rows_seen = []
    for epoch in (0, 1):
        for lo in loaders:
            batches = list(lo.epoch(epoch))
            mix = np.concatenate([b.label.numpy() for b in batches]).mean()
            assert abs(mix - overall) <= 0.02, (order, epoch, mix, overall)
            rows_seen.append({int(v) for b in batches for v in b.numeric[:, 1]})
    assert len(rows_seen[0] & rows_seen[2]) < 0.75 * len(rows_seen[0])  # rank 0, epochs 0 and 1


def test_a_format_2_folder_is_read_as_written_with_a_note(tmp_path, caplog):
    tables = [numbered(0, 300), numbered(300, 200)]
    manifest = write_local_shards(tmp_path, {"train": tables}, SPEC)
    # What the previous version wrote: format 2, no record batch counts, no deal.
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["format_version"] = 2
    for split in raw["splits"].values():
        split.pop("deal")
        for shard in split["shards"]:
            shard.pop("batches")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with caplog.at_level(logging.INFO, logger="lepton_spark.shards.manifest"):
        old = read_manifest(tmp_path)
    assert old.format_version == 2 and old.split("train").deal == "shards"
    assert "shard format 2, read as written" in caplog.text
    seen = []
    for rank in range(2):
        files, share = loader_files(old.split("train"), rank, 2)
        assert share is None  # whole shards per rank, as that version read them
        seen += row_ids(
            ShardLoader(tmp_path, files, layout=Layout(2, 1), batch_size=7, drop_last=False).epoch(
                0
            )
        )
    assert sorted(seen) == list(range(500))
    assert manifest.format_version == 3
