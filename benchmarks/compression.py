"""Shard compression side by side: bytes on disk and read rows/s for ``none``, ``lz4`` and
``zstd`` (``shards.compression``), the same synthetic demo rows written three ways.

Write time is measured too (one Python writer, no Spark: the codec's cost, not Spark's). Reads
go through the rank's :class:`~lepton_spark.shards.loader.ShardLoader` (batch 1024, one epoch,
the page cache warm), codecs alternating over the rounds; the ratios are over ``none``.

    python -m benchmarks.compression            # writes results/compression.json
"""

from __future__ import annotations

import argparse
import shutil

from benchmarks._common import SPEC, WORK, median, report, synthetic_table, timed
from lepton_spark.shards.loader import Layout, ShardLoader
from lepton_spark.shards.local import write_local_shards
from lepton_spark.shards.manifest import Manifest

CODECS = ("none", "lz4", "zstd")
LAYOUT = Layout(len(SPEC.numeric), len(SPEC.categorical))


def write(codec: str, rows: int, rows_per_shard: int) -> tuple[Manifest, float]:
    folder = WORK / "bench" / "compression" / codec
    shutil.rmtree(folder, ignore_errors=True)
    tables = [
        synthetic_table(min(rows_per_shard, rows - start), seed=start)
        for start in range(0, rows, rows_per_shard)
    ]
    manifest: list[Manifest] = []
    seconds = timed(
        lambda: manifest.append(
            write_local_shards(folder, {"train": tables}, SPEC, compression=codec)
        )
    )
    return manifest[0], seconds


def epoch_sum(data: ShardLoader) -> float:
    return sum(float(b.numeric.sum()) + float(b.label.sum()) for b in data.epoch(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rows-per-shard", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    written = {c: write(c, args.rows, args.rows_per_shard) for c in CODECS}
    loaders = {}
    for codec, (manifest, _) in written.items():
        folder = WORK / "bench" / "compression" / codec
        loaders[codec] = ShardLoader(
            folder, manifest.split("train").shards, batch_size=1024, layout=LAYOUT, verify=False
        )
    sums = {c: epoch_sum(data) for c, data in loaders.items()}  # also warms the page cache
    assert max(sums.values()) - min(sums.values()) < 1e-6 * abs(sums["none"]) + 1e-3, sums
    seconds: dict[str, list[float]] = {c: [] for c in CODECS}
    for _ in range(args.rounds):
        for codec, data in loaders.items():
            seconds[codec].append(timed(lambda data=data: epoch_sum(data)))
            print(f"{codec}: {args.rows / seconds[codec][-1]:,.0f} rows/s", flush=True)
    size = {c: sum(s.bytes for s in m.split("train").shards) for c, (m, _) in written.items()}
    rate = {c: args.rows / median(v) for c, v in seconds.items()}
    ratios = {}
    for codec in ("lz4", "zstd"):
        ratios[f"{codec}_over_none_bytes"] = size[codec] / size["none"]
        ratios[f"{codec}_over_none_read_rows_per_s"] = rate[codec] / rate["none"]
        ratios[f"{codec}_over_none_write_seconds"] = written[codec][1] / written["none"][1]
    report(
        "compression",
        ratios,
        {
            "rows": args.rows,
            "bytes": size,
            "read_rows_per_s": rate,
            "write_seconds": {c: s for c, (_, s) in written.items()},
            "read_seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
