"""Does training wait for data? The shard loader against preloaded in-memory tensors.

One rank, the same model, batch size and number of steps, fed (a) from tensors already in memory
(a per-epoch permutation, each batch gathered by index: the fastest shuffled feed PyTorch has) and
(b) from the shard loader (memory-mapped Arrow, shuffle buffer, background prefetch). Rounds
alternate a and b; medians are compared. Also the loader's raw read rate against a plain
memory-mapped ``pyarrow`` read of the same files (both sum every value, so both touch every byte).

    python -m benchmarks.data_path            # writes benchmarks/results/data_path.json
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F

from benchmarks._common import (
    DEMO_MODEL,
    RECORD_BATCH_ROWS,
    SPEC,
    WORK,
    median,
    report,
    synthetic_shards,
    timed,
)
from lepton_spark.config import ModelConfig
from lepton_spark.models import build_model
from lepton_spark.shards.format import row_bytes
from lepton_spark.shards.loader import Batch, Layout, ShardLoader, record_batches
from lepton_spark.shards.manifest import Manifest

# About 10× fewer multiply-adds per row than the demo MLP (25→128→64→2: 11.5k; 25→40→2: 1.1k).
LIGHT_MODEL = ModelConfig(hidden=[40], embedding_dim=8)
LAYOUT = Layout.of(SPEC)


def macs_per_row(cfg: ModelConfig) -> int:
    width = len(SPEC.numeric) + cfg.embedding_dim * len(SPEC.categorical)
    total = 0
    for hidden in [*cfg.hidden, SPEC.num_classes]:
        total += width * hidden
        width = hidden
    return total


def in_memory(folder: Path, manifest: Manifest) -> Batch:
    """Every training row as contiguous tensors (a copy out of the shards)."""
    parts = [
        b
        for shard in manifest.split("train").shards
        for b in record_batches(folder / shard.path, LAYOUT)
    ]
    return Batch(*(torch.cat(ts).clone() for ts in zip(*(p.tensors() for p in parts), strict=True)))


def memory_batches(data: Batch, batch_size: int, steps: int, seed: int) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        yield Batch(*(t.index_select(0, index) for t in data.tensors()))


def train(model_cfg: ModelConfig, batches: Iterator[Batch]) -> int:
    model = build_model(model_cfg, SPEC, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 0
    for batch in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(LAYOUT.inputs(batch)), batch.label).backward()
        optimizer.step()
        steps += 1
    return steps


def compare(
    model_cfg: ModelConfig,
    folder: Path,
    manifest: Manifest,
    batch: int,
    steps: int,
    rounds: int,
    prefetch: int | None = None,
) -> dict[str, float]:
    data = in_memory(folder, manifest)
    shards = manifest.split("train").shards

    def loader(seed: int) -> ShardLoader:
        return ShardLoader(
            folder,
            shards,
            layout=LAYOUT,
            batch_size=batch,
            steps=steps,
            shuffle=True,
            seed=seed,
            verify=False,  # checked once when a rank starts, not per epoch
            prefetch=prefetch,
        )

    train(model_cfg, memory_batches(data, batch, 50, 0))  # warm up allocator and kernels
    train(model_cfg, iter(list(loader(0).epoch(0))[:50]))
    memory_s, loader_s = [], []
    for r in range(rounds):
        memory_s.append(timed(lambda r=r: train(model_cfg, memory_batches(data, batch, steps, r))))
        feed = loader(r)
        loader_s.append(timed(lambda feed=feed, r=r: train(model_cfg, feed.epoch(r))))
    rows = batch * steps
    return {
        "memory_rows_per_s": rows / median(memory_s),
        "loader_rows_per_s": rows / median(loader_s),
        "loader_vs_memory": median(memory_s) / median(loader_s),
        "memory_seconds": memory_s,
        "loader_seconds": loader_s,
        "step_ms_memory": 1000 * median(memory_s) / steps,
    }


def raw_arrow_sum(places: list[Path]) -> float:
    total = 0.0
    for place in places:
        with pa.memory_map(str(place)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                rb = reader.get_batch(i)
                for name in ("numeric", "categorical"):
                    values = rb.column(name).flatten().to_numpy(zero_copy_only=True)
                    total += float(torch.from_numpy(values).sum())
                total += float(torch.from_numpy(rb.column("label").to_numpy()).sum())
    return total


def loader_sum(data: ShardLoader) -> float:
    total = 0.0
    for b in data.epoch(0):
        total += float(b.numeric.sum()) + float(b.categorical.sum()) + float(b.label.sum())
    return total


def read_rates(folder: Path, manifest: Manifest, batch: int, rounds: int) -> dict[str, float]:
    """Rows/s and MB/s: plain pyarrow (a record batch at a time) against the loader cutting
    record-batch-sized batches (the same granularity), ``batch``-row batches, and shuffled."""
    shards = manifest.split("train").shards
    places = [folder / s.path for s in shards]
    common = {
        "layout": LAYOUT,
        "drop_last": False,
        "verify": False,
    }
    loaders = {
        "loader": ShardLoader(folder, shards, batch_size=RECORD_BATCH_ROWS, **common),
        f"loader_batch{batch}": ShardLoader(folder, shards, batch_size=batch, **common),
        f"loader_batch{batch}_shuffled": ShardLoader(
            folder, shards, batch_size=batch, shuffle=True, **common
        ),
    }
    expected = raw_arrow_sum(places)  # also warms the page cache: everything reads from memory
    for data in loaders.values():
        assert abs(loader_sum(data) - expected) < 1e-6 * abs(expected) + 1e-3
    seconds: dict[str, list[float]] = {"raw_arrow": [], **{k: [] for k in loaders}}
    for _ in range(rounds):
        seconds["raw_arrow"].append(timed(lambda: raw_arrow_sum(places)))
        for name, data in loaders.items():
            seconds[name].append(timed(lambda data=data: loader_sum(data)))
    rows = manifest.split("train").rows
    mb = rows * row_bytes(SPEC) / 1e6
    out: dict[str, float] = {}
    for name, values in seconds.items():
        out[f"{name}_rows_per_s"] = rows / median(values)
        out[f"{name}_mb_per_s"] = mb / median(values)
        if name != "raw_arrow":
            out[f"{name}_vs_raw_arrow"] = median(seconds["raw_arrow"]) / median(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=900_000, help="training rows (demo: 900k)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1_500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    folder = WORK / "bench" / f"data-path-{args.rows}"
    manifest = synthetic_shards(folder, args.rows)
    details: dict = {"rows": args.rows, "batch_size": args.batch_size, "steps": args.steps}
    ratios: dict[str, float] = {}
    runs = [
        (label, cfg, threads, None)
        for threads in args.threads
        for label, cfg in (("demo_mlp", DEMO_MODEL), ("light_mlp", LIGHT_MODEL))
    ]
    for label, cfg, threads, prefetch in runs:
        torch.set_num_threads(threads)
        result = compare(cfg, folder, manifest, args.batch_size, args.steps, args.rounds, prefetch)
        result["macs_per_row"] = macs_per_row(cfg)
        name = f"{label},threads={threads}" + (",prefetch_thread" if prefetch else "")
        details[name] = result
        ratios[f"loader_vs_memory[{name}]"] = result["loader_vs_memory"]
        print(
            f"{name}: {result['loader_vs_memory']:.3f} "
            f"({result['step_ms_memory']:.2f} ms/step in memory)",
            flush=True,
        )
    torch.set_num_threads(1)
    details["read"] = read_rates(folder, manifest, args.batch_size, args.rounds)
    for key, value in details["read"].items():
        if key.endswith("_vs_raw_arrow"):
            ratios[key] = value
    details["models"] = {
        "demo_mlp": {"hidden": DEMO_MODEL.hidden, "macs_per_row": macs_per_row(DEMO_MODEL)},
        "light_mlp": {"hidden": LIGHT_MODEL.hidden, "macs_per_row": macs_per_row(LIGHT_MODEL)},
    }
    report("data_path", ratios, details)


if __name__ == "__main__":
    main()
