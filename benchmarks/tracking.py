"""What live tracking costs training: the demo pipeline with and without per-step metrics.

All arms run the same pipeline on the same shards (2 ranks, local[2], a local MLflow store):
(a) quiet: no per-step metrics (``train.progress_every_steps`` larger than an epoch), no system
metrics; (b) defaults: per-step train loss and throughput every 50 steps through MLflow's
asynchronous logger, system metrics every 10 s; (c) dense: per-step metrics every 10 steps and
system metrics every second. Rounds alternate a, b and c; the medians of the ranks' time inside
the epochs (``epoch_seconds``, where a slow logger would hold training up) and of the training
stage's wall time are compared. Wall
times on a shared 2-core machine move by a few percent from run to run, more than the effect, so
the driver's CPU time from the stage's start to its last epoch (psutil, the whole driver process:
event channel, MLflow's logger, the system-metrics sampler) is measured too: an arm's extra
driver CPU over the ranks' CPU time (ranks × epoch seconds) is the share of the machine the
tracking took from training.

    python -m benchmarks.tracking [--rows 400000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import psutil

from benchmarks._common import median, report
from lepton_spark import run_pipeline
from lepton_spark.config import load_config
from lepton_spark.data.session import spark_session
from lepton_spark.events import Event

ROOT = Path(__file__).resolve().parents[1]


def _driver_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lepton-bench-tracking-"))
    base = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {
            "sources.events.generate.rows": args.rows,
            "train.epochs": 2,
            "shards.root": str(work / "shards"),
            "train.checkpoint_root": str(work / "checkpoints"),
            "tracking.local_store": str(work / "mlruns-data"),
            "tracking.registered_model": None,
        },
    )
    quiet = base.with_overrides(
        {"train.progress_every_steps": 1_000_000, "tracking.system_metrics_interval_s": None}
    )
    defaults = base.with_overrides(
        {"train.progress_every_steps": 50, "tracking.system_metrics_interval_s": 10.0}
    )
    dense = base.with_overrides(
        {"train.progress_every_steps": 10, "tracking.system_metrics_interval_s": 1.0}
    )
    configs = {"quiet": quiet, "defaults": defaults, "dense": dense}
    spark = spark_session(base.spark.model_copy(update={"master": "local[2]"}), app_name="tracking")
    run_pipeline(quiet, spark=spark, progress=lambda e: None)  # shards written, JIT warm
    arms: dict[str, dict[str, list[float]]] = {
        name: {"epoch_s": [], "stage_s": [], "step_metrics": [], "driver_cpu_s": []}
        for name in configs
    }
    for i in range(args.rounds):
        for name, cfg in configs.items():
            marks: dict[str, float] = {}

            def progress(event: Event, marks: dict[str, float] = marks) -> None:
                if event.event in ("start", "epoch"):
                    marks.setdefault(event.event, _driver_cpu())
                    if event.event == "epoch":
                        marks["end"] = _driver_cpu()

            result = run_pipeline(cfg, spark=spark, progress=progress)
            arms[name]["driver_cpu_s"].append(marks["end"] - marks["start"])
            arms[name]["epoch_s"].append(sum(h["train/epoch_seconds"] for h in result.history))
            arms[name]["stage_s"].append(result.timings["training"])
            from mlflow import MlflowClient

            logged = MlflowClient(result.tracking_uri).get_metric_history(
                result.run_id, "train/loss_step"
            )
            arms[name]["step_metrics"].append(len(logged))
        print(
            f"round {i + 1}: "
            + ", ".join(
                f"{name} epochs {d['epoch_s'][-1]:.2f} s, driver CPU {d['driver_cpu_s'][-1]:.2f} s"
                f" ({d['step_metrics'][-1]} step metrics)"
                for name, d in arms.items()
            )
        )
    spark.stop()
    shutil.rmtree(work, ignore_errors=True)
    quiet_cpu = median(arms["quiet"]["driver_cpu_s"])
    ratios = {}
    for name in ("defaults", "dense"):
        arm = arms[name]
        ratios[f"{name}_over_quiet_epoch_time"] = median(arm["epoch_s"]) / median(
            arms["quiet"]["epoch_s"]
        )
        ratios[f"{name}_over_quiet_stage_time"] = median(arm["stage_s"]) / median(
            arms["quiet"]["stage_s"]
        )
        rank_cpu = base.train.num_workers * median(arm["epoch_s"])
        ratios[f"{name}_driver_cpu_over_rank_cpu"] = (
            median(arm["driver_cpu_s"]) - quiet_cpu
        ) / rank_cpu
    report(
        "tracking",
        ratios,
        {
            "rows": args.rows,
            "rounds": args.rounds,
            "goal": "tracking at the defaults costs < 1% of training time",
            **{f"{arm}_{k}": v for arm, d in arms.items() for k, v in d.items()},
        },
    )


if __name__ == "__main__":
    main()
