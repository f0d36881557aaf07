"""Memory per rank does not grow with the data: peak RSS streaming 1× and 10× the rows.

Each size is streamed through one epoch of the shard loader (shuffled, checksums verified, every
value summed) in a fresh process, which reports its peak resident set size: as rank 0 of 2 reads
a split dealt by row blocks (the ``random`` strategy: blocks from every file, ``rss_10x_over_1x``)
and, beside it, one process reading whole shards (``hash``/``range``, ``..._whole_shards``).

    python -m benchmarks.memory              # 2M and 20M rows; writes results/memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from benchmarks._common import SPEC, WORK, report, run_json, synthetic_shards
from lepton_spark.shards.format import row_bytes


def stream(folder: str) -> dict[str, float]:
    """Child process: one shuffled epoch of this rank's rows; peak RSS in MB."""
    from lepton_spark.shards.loader import Layout, ShardLoader, loader_files
    from lepton_spark.shards.manifest import read_manifest

    manifest = read_manifest(folder)
    split = manifest.split("train")
    started = time.perf_counter()
    files, share = loader_files(split, 0, 2 if split.deal == "blocks" else 1)
    loader = ShardLoader(
        folder,
        files,
        layout=Layout.of(SPEC),
        batch_size=512,
        shuffle=True,
        drop_last=False,
        share=share,
    )
    rows, total = 0, 0.0
    for batch in loader.epoch(0):
        rows += len(batch)
        total += float(batch.numeric.sum())
    assert rows == loader.rows, (rows, loader.rows)
    return {
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(folder: str) -> dict[str, float]:
    return run_json([sys.executable, "-m", "benchmarks.memory", "--child", folder])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="the 1× size")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(stream(args.child)))
        return

    results: dict[str, dict[int, dict[str, float]]] = {"blocks": {}, "shards": {}}
    for deal, runs in results.items():
        for rows in (args.rows, args.rows * args.factor):
            folder = WORK / "bench" / f"memory-{deal}-{rows}"
            synthetic_shards(folder, rows, deal=deal)  # type: ignore[arg-type]
            runs[rows] = measure(str(folder))
            runs[rows]["shard_bytes_mb"] = rows * row_bytes(SPEC) / 1e6
            print(
                f"{deal:>6} {rows:>12,} rows: peak RSS {runs[rows]['peak_rss_mb']:.0f} MB "
                f"({runs[rows]['shard_bytes_mb']:.0f} MB of shards)",
                flush=True,
            )

    def ratio(deal: str) -> float:
        runs = results[deal]
        return runs[args.rows * args.factor]["peak_rss_mb"] / runs[args.rows]["peak_rss_mb"]

    report(
        "memory",
        {
            f"rss_{args.factor}x_over_1x": ratio("blocks"),
            f"rss_{args.factor}x_over_1x_whole_shards": ratio("shards"),
        },
        {deal: {str(k): v for k, v in runs.items()} for deal, runs in results.items()},
    )


if __name__ == "__main__":
    main()
