"""Memory per rank does not grow with the data: peak RSS streaming 1× and 10× the rows.

Each size is streamed through one epoch of the shard loader (shuffled, checksums verified, every
value summed) in a fresh process, which reports its peak resident set size.

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
    """Child process: one shuffled epoch over every shard; peak RSS in MB."""
    from lepton_spark.shards.loader import Layout, ShardLoader
    from lepton_spark.shards.manifest import read_manifest

    manifest = read_manifest(folder)
    split = manifest.split("train")
    started = time.perf_counter()
    loader = ShardLoader(
        folder,
        split.shards,
        layout=Layout.of(SPEC),
        batch_size=512,
        shuffle=True,
        drop_last=False,
    )
    rows, total = 0, 0.0
    for batch in loader.epoch(0):
        rows += len(batch)
        total += float(batch.numeric.sum())
    assert rows == split.rows, (rows, split.rows)
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

    results = {}
    for rows in (args.rows, args.rows * args.factor):
        folder = WORK / "bench" / f"memory-{rows}"
        synthetic_shards(folder, rows)
        results[rows] = measure(str(folder))
        results[rows]["shard_bytes_mb"] = rows * row_bytes(SPEC) / 1e6
        print(
            f"{rows:>12,} rows: peak RSS {results[rows]['peak_rss_mb']:.0f} MB "
            f"({results[rows]['shard_bytes_mb']:.0f} MB of shards)",
            flush=True,
        )
    small, large = results[args.rows], results[args.rows * args.factor]
    report(
        "memory",
        {f"rss_{args.factor}x_over_1x": large["peak_rss_mb"] / small["peak_rss_mb"]},
        {str(k): v for k, v in results.items()},
    )


if __name__ == "__main__":
    main()
