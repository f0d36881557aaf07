"""Spark DataFrame → torch batches: our shards + loader against Petastorm, on the same frame.

Both sides build the same cached DataFrame on a ``local[2]`` Spark, then time (1) materializing it
(ours: ``write_shards``, executors writing checksummed Arrow shards; Petastorm:
``make_spark_converter``, Spark writing Parquet) and (2) reading one epoch as torch batches
(ours: ``ShardLoader`` as one rank of one reads its dealt rows; Petastorm:
``make_torch_dataloader``), unshuffled as Petastorm's default. Where our materialize time goes is
recorded too (``materialize_stages``: the driver's wall time, and the executors' seconds by stage
summed over tasks: rows computed and sent to Python, packing, the in-file shuffle, the IPC write
with its sha256), and the floor any Python-side writer stands on (``materialize_over_floor``: the
same cached frame through a ``mapInArrow`` that only counts).
Each side materializes twice: cold (the session's first writing job) and warm (a second, fresh
write); the reads come after.

Petastorm 0.12.1 (its last release) needs pyarrow < 13 (it imports ``pyarrow.filesystem``), so it
runs from its own environment, ``.venv-petastorm`` (``make bench-petastorm-env``).

    python -m benchmarks.vs_petastorm        # writes results/vs_petastorm.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from benchmarks._common import SPEC, WORK, report, run_json
from benchmarks._frame import local_spark, make_frame
from lepton_spark.config import ShardConfig
from lepton_spark.shards.loader import Layout, ShardLoader, loader_files
from lepton_spark.shards.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]
PETASTORM_PYTHON = ROOT / ".venv-petastorm" / "bin" / "python"


def ours(rows: int, batch: int) -> dict[str, float]:
    spark = local_spark("lepton side")
    df = make_frame(spark, rows)
    materialize, stages = [], {}
    for attempt in ("cold", "warm"):  # cold: the first Python workers start inside the write
        folder = WORK / "bench" / f"vs-petastorm-{attempt}"
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        shard_set = write_shards(
            {"train": df},
            SPEC,
            str(folder),
            ShardConfig(rows_per_shard=250_000),
            num_workers=2,
            estimated_rows={"train": rows},
            fingerprint="vs-petastorm",
        )
        materialize.append(time.perf_counter() - started)
        stages[attempt] = {"wall_s": materialize[-1], **shard_set.task_seconds}
    floor = [export_floor(df) for _ in range(3)]  # warm, as the warm write above
    spark.stop()
    split = shard_set.manifest.split("train")
    timings = {}
    for shuffle in (False, True):
        started = time.perf_counter()
        files, share = loader_files(split, 0, 1)
        loader = ShardLoader(  # includes checking every shard's sha256, as a rank does
            shard_set.folder,
            files,
            layout=Layout.of(SPEC),
            batch_size=batch,
            shuffle=shuffle,
            drop_last=False,
            share=share,
        )
        seen = sum(len(b) for b in loader.epoch(0))
        timings["read_shuffled_s" if shuffle else "read_s"] = time.perf_counter() - started
        assert seen == rows, (seen, rows)
    return {
        "rows": rows,
        "materialize_cold_s": materialize[0],
        "materialize_s": materialize[1],
        "materialize_stages": stages,
        # The median: ours is one warm write, not the best of several.
        "floor_s": statistics.median(floor),
        "floor_runs_s": floor,
        "files": len(split.shards),
        **timings,
    }


def export_floor(df: Any) -> float:
    """Seconds for the floor of any Python-side writer: the same cached frame through a
    ``mapInArrow`` that only counts its rows (Spark's Arrow export to the Python workers and
    nothing else, on the same 4 partitions)."""

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        n = sum(b.num_rows for b in batches)
        yield pa.RecordBatch.from_pydict({"n": [n]})

    started = time.perf_counter()
    total = sum(r.n for r in df.mapInArrow(count, "n long").collect())
    seconds = time.perf_counter() - started
    assert total == df.count(), total  # a job of its own: outside the time
    return seconds


def petastorm(rows: int, batch: int) -> dict[str, float]:
    if not PETASTORM_PYTHON.exists():
        raise SystemExit(f"{PETASTORM_PYTHON} is missing: run `make bench-petastorm-env` first")
    cache = WORK / "bench" / "petastorm-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return run_json(
        [
            str(PETASTORM_PYTHON),
            str(Path(__file__).parent / "petastorm_side.py"),
            str(rows),
            str(batch),
            cache.as_uri(),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    mine = ours(args.rows, args.batch_size)
    print("lepton-spark:", mine, flush=True)
    print(f"materialize over the floor: {mine['materialize_s'] / mine['floor_s']:.2f}", flush=True)
    theirs = petastorm(args.rows, args.batch_size)
    print("petastorm:   ", theirs, flush=True)
    report(
        "vs_petastorm",
        {
            "materialize_speedup_vs_petastorm": theirs["materialize_s"] / mine["materialize_s"],
            # 1.0 would be a writer that costs nothing beyond Spark's export to Python.
            "materialize_over_floor": mine["materialize_s"] / mine["floor_s"],
            "materialize_cold_speedup_vs_petastorm": theirs["materialize_cold_s"]
            / mine["materialize_cold_s"],
            "read_rows_per_s_vs_petastorm": theirs["read_s"] / mine["read_s"],
            "read_shuffled_rows_per_s_vs_petastorm": theirs["read_s"] / mine["read_shuffled_s"],
            # What a user waits for before and through the first epoch: materialize + one read.
            "first_epoch_speedup_vs_petastorm": (theirs["materialize_s"] + theirs["read_s"])
            / (mine["materialize_s"] + mine["read_s"]),
        },
        {
            "lepton_spark": {**mine, "rows_per_s": args.rows / mine["read_s"]},
            "petastorm": {**theirs, "rows_per_s": args.rows / theirs["read_s"]},
            "petastorm_stack": "petastorm 0.12.1, pyarrow 12.0.1, pyspark 4.3.0, numpy<2",
        },
    )


if __name__ == "__main__":
    main()
