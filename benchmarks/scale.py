"""The demo pipeline at growing row counts: time grows linearly, a rank's memory does not.

``pipelines/tabular_demo.yaml`` (its generated table, SQL, features and split) at each size of
``--rows`` (1M, 10M, 30M by default), 2 ranks on ``local[2]`` (1 torch thread each, the demo's
backend), 1 epoch, the shards written afresh (``rebuild_shards``), no model registry, no system
metrics. Each size runs alone in a fresh interpreter (``--one N``, which prints its figures as one
JSON line) with a work folder of its own (shards, checkpoints, MLflow store) under ``WORK``,
removed after it; a size whose folder's disk has under 3× its estimated footprint is skipped.

Measured per size:

- **seconds** of ``run_pipeline``'s own stages (``PipelineResult.timings``): ``etl`` (the
  dataset fingerprint and the feature passes: vocabularies, row count, standardization),
  ``shards`` (materialize: the cached features computed, split, balanced and written), and one
  training **epoch** (``train/epoch_seconds`` of the epoch's history: the rank loop alone, no
  launch, no validation); the whole training stage (launch and validation too) is kept beside it;
- **peak RSS of the driver**: ``getrusage(RUSAGE_SELF).ru_maxrss`` of the ``--one`` process (the
  Python driver), and of its Spark JVM (``VmHWM``, sampled);
- **peak RSS of a rank**: the ranks' child processes (``lepton_spark.cluster.rank_main``) report
  no memory of their own, so a thread of the ``--one`` process reads each one's ``VmHWM`` (the
  kernel's high-water mark of its resident set) from ``/proc`` every 0.2 s; growth in a rank's
  last 0.2 s before it exits is not seen. The figure is the larger rank's;
- **bytes of the shards** on disk (every file under the fresh shards root).

Ratios, over the sizes measured: each stage's growth exponent, the least-squares slope of
log(seconds) over log(rows). Goal: ≤ 1.05 for ``etl``, ``shards`` and the epoch. A rank's peak RSS
at the largest size over the smallest. Goal: ≤ 1.2. The driver's ratio is only reported. Fixed
costs (each stage's Spark jobs take seconds whatever the rows) flatten the slope over small
sizes: the exponent between the two largest sizes alone is reported beside it
(``details.largest_pair_exponents``), and the per-size seconds are all in the JSON.

    python -m benchmarks.scale                    # writes results/scale.json
    python -m benchmarks.scale --rows 200000,2000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import WORK, demo_config, report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = "1000000,10000000,30000000"
# What a size may hold on disk at once, per generated row: the shards (60 B a demo row), Spark's
# cached features spilled to disk, the MLflow store. Rough on purpose: free disk must be 3× this.
ESTIMATE_BYTES_PER_ROW = 200
SAMPLE_S = 0.2
RANK_MODULE = "lepton_spark.cluster.rank_main"
RANK_PREFIX = "lepton-rank"  # the rank's work folder, its one argument: lepton-rank<rank>-…
GOALS = {
    "etl_growth_exponent": 1.05,
    "materialize_growth_exponent": 1.05,
    "epoch_growth_exponent": 1.05,
    "rank_peak_rss_largest_over_smallest": 1.2,
}


def high_water_mb(pid: int) -> float | None:
    """The process's peak resident set (``VmHWM``) in MB, or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class PeakSampler(threading.Thread):
    """Every ``SAMPLE_S``: the high-water mark of this process's rank children and Spark JVM."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="scale-peak-sampler")
        self.stopped = threading.Event()
        self.kinds: dict[int, str] = {}  # pid → "jvm" | "rank<n>" | "" (neither)
        self.peaks: dict[int, float] = {}

    def kind(self, process: Any) -> str:
        try:
            argv = process.cmdline()
        except Exception:  # gone, or not ours to read
            return ""
        if RANK_MODULE in argv:
            folder = os.path.basename(argv[-1].rstrip("/"))
            rank = folder.removeprefix(RANK_PREFIX).split("-")[0]
            return f"rank{rank}" if folder.startswith(RANK_PREFIX) and rank else "rank?"
        if any(a.endswith("SparkSubmit") for a in argv):
            return "jvm"
        return ""

    def sample(self) -> None:
        import psutil

        for process in psutil.Process().children(recursive=True):
            if process.pid not in self.kinds:
                self.kinds[process.pid] = self.kind(process)
            if self.kinds[process.pid]:
                mb = high_water_mb(process.pid)
                if mb is not None:
                    self.peaks[process.pid] = max(mb, self.peaks.get(process.pid, 0.0))

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.sample()

    def peak_of(self, prefix: str) -> dict[str, float]:
        """Peak MB per kind starting with ``prefix`` (several processes of a kind: the largest)."""
        peaks: dict[str, float] = {}
        for pid, mb in self.peaks.items():
            kind = self.kinds[pid]
            if kind.startswith(prefix):
                peaks[kind] = max(mb, peaks.get(kind, 0.0))
        return dict(sorted(peaks.items()))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def one(rows: int, work: Path) -> dict[str, Any]:
    """Child process: the demo pipeline at ``rows`` rows; its figures."""
    from lepton_spark import run_pipeline
    from lepton_spark.data.session import spark_session
    from lepton_spark.names import TRAIN_EPOCH_SECONDS

    cfg = demo_config(rows, 1, work, {"train.num_workers": 2, "train.threads_per_rank": 1})
    sampler = PeakSampler()
    sampler.start()
    try:
        spark = spark_session(cfg.spark, app_name=f"lepton-spark scale {rows}")
        started = time.perf_counter()
        result = run_pipeline(cfg, spark=spark, progress=lambda e: None, rebuild_shards=True)
        seconds = time.perf_counter() - started
        shard_bytes = folder_bytes(Path(cfg.shards.root))
        spark.stop()
    finally:
        sampler.stop()
    ranks = sampler.peak_of("rank")
    jvm = sampler.peak_of("jvm")
    return {
        "rows": rows,
        "rows_written": result.rows,
        "seconds": {
            "etl": result.timings["etl"],
            "materialize": result.timings["shards"],
            "epoch": result.history[0][TRAIN_EPOCH_SECONDS],
            "training_stage": result.timings["training"],
            "pipeline": seconds,
        },
        "timings": result.timings,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_jvm_peak_rss_mb": jvm.get("jvm"),
        "rank_peak_rss_mb": max(ranks.values()) if ranks else None,
        "ranks_peak_rss_mb": ranks,
        "shard_bytes": shard_bytes,
        "val_accuracy": result.metrics.get("val/accuracy"),
    }


def free_bytes(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def measure(rows: int, work: Path) -> dict[str, Any]:
    """One size in a fresh interpreter (its output on this console, its figures as JSON)."""
    command = [sys.executable, "-m", "benchmarks.scale", "--one", str(rows), "--work", str(work)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stdout.splitlines()[-20:])
        return {"rows": rows, "error": f"exit code {done.returncode}\n{tail}"}
    return json.loads(lines[-1])


def growth_exponent(rows: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) over log(rows)."""
    x = [math.log(r) for r in rows]
    y = [math.log(s) for s in seconds]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
        (a - mx) ** 2 for a in x
    )


def mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def table(sizes: list[dict[str, Any]]) -> None:
    print(
        f"\n{'rows':>12} {'etl s':>8} {'shards s':>9} {'epoch s':>8} {'train s':>8} "
        f"{'driver MB':>10} {'JVM MB':>8} {'rank MB':>8} {'shards MB':>10}"
    )
    for size in sizes:
        s = size["seconds"]
        print(
            f"{size['rows']:>12,} {s['etl']:>8.1f} {s['materialize']:>9.1f} {s['epoch']:>8.1f} "
            f"{s['training_stage']:>8.1f} {mb(size['driver_peak_rss_mb']):>10} "
            f"{mb(size['driver_jvm_peak_rss_mb']):>8} {mb(size['rank_peak_rss_mb']):>8} "
            f"{size['shard_bytes'] / 1e6:>10,.0f}"
        )


STAGES = ("etl", "materialize", "epoch", "training_stage")


def largest_pair(sizes: list[dict[str, Any]]) -> dict[str, float]:
    """Each stage's growth exponent between the two largest sizes alone."""
    if len({s["rows"] for s in sizes}) < 2:
        return {}
    pair = sorted(sizes, key=lambda s: s["rows"])[-2:]
    rows = [s["rows"] for s in pair]
    return {stage: growth_exponent(rows, [s["seconds"][stage] for s in pair]) for stage in STAGES}


def ratios_of(sizes: list[dict[str, Any]]) -> dict[str, float]:
    if len({s["rows"] for s in sizes}) < 2:
        return {}
    rows = [s["rows"] for s in sizes]
    ratios = {
        f"{stage}_growth_exponent": growth_exponent(rows, [s["seconds"][stage] for s in sizes])
        for stage in ("etl", "materialize", "epoch")
    }
    small, large = min(sizes, key=lambda s: s["rows"]), max(sizes, key=lambda s: s["rows"])
    if small["rank_peak_rss_mb"] and large["rank_peak_rss_mb"]:
        ratios["rank_peak_rss_largest_over_smallest"] = (
            large["rank_peak_rss_mb"] / small["rank_peak_rss_mb"]
        )
    ratios["driver_peak_rss_largest_over_smallest"] = (
        large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated row counts")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.work)), flush=True)
        return

    sizes = sorted({int(r.replace("_", "")) for r in args.rows.split(",") if r.strip()})
    measured: list[dict[str, Any]] = []
    left_out: dict[str, str] = {}
    for rows in sizes:
        work = WORK / "bench" / "scale" / f"rows-{rows}"
        shutil.rmtree(work, ignore_errors=True)
        need, free = 3 * rows * ESTIMATE_BYTES_PER_ROW, free_bytes(work)
        if free < need:
            left_out[str(rows)] = f"skipped: {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB"
            print(f"{rows:,} rows {left_out[str(rows)]} (3× the estimate)", flush=True)
            continue
        print(f"{rows:,} rows ...", flush=True)
        try:
            size = measure(rows, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if "error" in size:
            left_out[str(rows)] = size["error"]
            print(f"{rows:,} rows failed: {size['error']}", flush=True)
            continue
        measured.append(size)
        s = size["seconds"]
        print(
            f"{rows:,} rows: etl {s['etl']:.1f} s, shards {s['materialize']:.1f} s, "
            f"epoch {s['epoch']:.1f} s, rank peak RSS {mb(size['rank_peak_rss_mb'])} MB",
            flush=True,
        )
    if measured:
        table(measured)
    ratios = ratios_of(measured)
    pair = largest_pair(measured)
    if pair:
        print(
            "growth exponents, the two largest sizes alone: "
            + ", ".join(f"{stage} {value:.3f}" for stage, value in pair.items())
        )
    for name, goal in GOALS.items():
        if name in ratios:
            met = "met" if ratios[name] <= goal else "NOT met"
            print(f"{name:>40}: {ratios[name]:.3f} (goal ≤ {goal}: {met})")
        else:
            print(f"{name:>40}: not measured (fewer than 2 sizes, or no rank figure)")
    report(
        "scale",
        ratios,
        {
            "sizes": measured,
            "left_out": left_out,
            "goals": GOALS,
            "training_stage_growth_exponent": (
                growth_exponent(
                    [s["rows"] for s in measured],
                    [s["seconds"]["training_stage"] for s in measured],
                )
                if pair
                else None
            ),
            "largest_pair_exponents": pair,
            "ranks": 2,
            "epochs": 1,
            "master": "local[2]",
            "rss_sample_s": SAMPLE_S,
        },
    )


if __name__ == "__main__":
    main()
