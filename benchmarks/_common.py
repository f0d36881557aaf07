"""Shared pieces of the benchmarks: synthetic shards, timing, and where results go."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lepton_spark.config import ModelConfig
from lepton_spark.shards.local import write_local_shards
from lepton_spark.shards.manifest import FORMAT_VERSION, Deal, Manifest
from lepton_spark.spec import CategoricalFeature, FeatureSpec

RESULTS = Path(os.environ.get("LEPTON_BENCH_RESULTS", Path(__file__).parent / "results"))
WORK = Path(os.environ.get("LEPTON_BENCH_WORK", Path(__file__).resolve().parents[1] / ".lepton"))

# The demo's shape: 9 numeric features, 2 categorical ones (12 and 6 levels), a binary label.
SPEC = FeatureSpec(
    numeric=[f"x{i}" for i in range(9)],
    categorical=[
        CategoricalFeature(name="cat_a", vocabulary=[f"a{i:02d}" for i in range(12)]),
        CategoricalFeature(name="cat_b", vocabulary=[f"b{i}" for i in range(6)]),
    ],
    label="label",
    num_classes=2,
)
DEMO_MODEL = ModelConfig(hidden=[128, 64], embedding_dim=8)
# Spark's default Arrow batch (spark.sql.execution.arrow.maxRecordsPerBatch): shards written by
# executors come in record batches of this many rows.
RECORD_BATCH_ROWS = 10_000


def synthetic_table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 9), dtype=np.float32)
    columns: dict[str, Any] = {f"x{i}": x[:, i] for i in range(9)}
    columns["cat_a"] = rng.integers(0, 13, rows)
    columns["cat_b"] = rng.integers(0, 7, rows)
    columns["label"] = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(np.int64)
    return pa.Table.from_batches(pa.table(columns).to_batches(max_chunksize=RECORD_BATCH_ROWS))


def demo_config(rows: int, epochs: int, work: Path, extra: dict[str, Any] | None = None) -> Any:
    """``pipelines/tabular_demo.yaml`` at ``rows`` generated rows on ``local[2]``, its shards,
    checkpoints and MLflow store under ``work``, no registry, no system metrics (plus ``extra``
    overrides)."""
    from lepton_spark.config import load_config

    return load_config(
        Path(__file__).resolve().parents[1] / "pipelines" / "tabular_demo.yaml",
        {
            "spark.master": "local[2]",
            "sources.events.generate.rows": rows,
            "train.epochs": epochs,
            "shards.root": str(work / "shards"),
            "train.checkpoint_root": str(work / "checkpoints"),
            "tracking.local_store": str(work / "mlruns-data"),
            "tracking.registered_model": None,
            "tracking.system_metrics_interval_s": None,
            **(extra or {}),
        },
    )


def committed(folder: Path) -> Manifest | None:
    """The benchmark folder's manifest, or ``None`` when it has to be written (again)."""
    from lepton_spark.errors import ShardError
    from lepton_spark.shards.commit import find_committed

    try:
        return find_committed(folder)[0]
    except ShardError:  # damaged: write it again
        return None


def synthetic_shards(
    folder: Path, rows: int, rows_per_shard: int = 250_000, deal: Deal = "shards"
) -> Manifest:
    """A committed shard folder of ``rows`` synthetic training rows (reused when present and of
    this format and ``deal``)."""
    manifest = committed(folder)
    if (
        manifest is not None
        and manifest.format_version == FORMAT_VERSION
        and manifest.split("train").rows == rows
        and manifest.split("train").deal == deal
    ):
        return manifest
    tables = (
        synthetic_table(min(rows_per_shard, rows - start), seed=start)
        for start in range(0, rows, rows_per_shard)
    )
    return write_local_shards(
        folder, {"train": tables}, SPEC, fingerprint=f"synthetic-{rows}", deal=deal
    )


def run_json(command: list[str]) -> dict[str, Any]:
    """Run a helper process that prints one JSON line last; that line, parsed."""
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pa.__version__,
    }


def report(name: str, ratios: dict[str, float], details: dict[str, Any]) -> Path:
    """Print the ratios (and goals) and write ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "ratios": ratios, "details": details, "machine": machine()}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\n== {name} ==")
    for key, value in ratios.items():
        print(f"{key:>34}: {value:.3f}")
    print(f"{'written':>34}: {path}")
    return path
