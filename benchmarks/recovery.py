"""Recovery: what a fault costs, measured side by side with a clean run of the same pipeline.

The demo pipeline (generated rows, 2 ranks on local[2], checkpoints every 20 steps), run clean,
then with rank 1 SIGKILLed at step 50, then with rank 1 hanging at step 50 (stall timeout 10 s).
Both faulty runs retry and resume from the checkpoint. Printed: each faulty run's wall time over
the clean one, and seconds from the failure being reported (or the stall starting) to the
resumed stage training again.

    python -m benchmarks.recovery [--rows 200000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import report
from lepton_spark import run_pipeline
from lepton_spark.config import load_config
from lepton_spark.data.session import spark_session
from lepton_spark.events import Event, Progress

ROOT = Path(__file__).resolve().parents[1]
STALL_S = 10.0


def timed_run(cfg: Any, spark: Any) -> tuple[float, list[tuple[float, Event]], Any]:
    seen: list[tuple[float, Event]] = []
    started = time.monotonic()
    result = run_pipeline(cfg, spark=spark, progress=lambda e: seen.append((time.monotonic(), e)))
    return time.monotonic() - started, seen, result


def first(seen: list[tuple[float, Event]], kind: str, after: float = 0.0) -> float:
    return next(t for t, e in seen if e.event == kind and t >= after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lepton-recovery-"))
    base = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {
            "sources.events.generate.rows": args.rows,
            "train.epochs": 2,
            "train.checkpoint_every_steps": 20,
            "train.stall_timeout_s": STALL_S,
            "shards.root": str(work / "shards"),
            "train.checkpoint_root": str(work / "checkpoints"),
            "tracking.local_store": str(work / "mlruns-data"),
        },
    )
    spark = spark_session(base.spark.model_copy(update={"master": "local[2]"}), app_name="recovery")
    run_pipeline(base, spark=spark, progress=lambda e: None)  # shards written, JIT warm
    clean_s, _, clean = timed_run(base, spark)
    kill_s, kill_events, killed = timed_run(
        base.with_overrides({"train.fault_inject": "kill:1:50"}), spark
    )
    hang_s, hang_events, hung = timed_run(
        base.with_overrides({"train.fault_inject": "hang:1:50"}), spark
    )
    spark.stop()

    reported = first(kill_events, "rank_failed")
    kill_recovery = first(kill_events, "start", after=reported) - reported
    # Rank 0 reports step 50 (progress_every_steps) as rank 1 starts hanging after it.
    stalled = next(
        t for t, e in hang_events if isinstance(e, Progress) and (e.epoch, e.step) == (1, 50)
    )
    hang_recovery = first(hang_events, "start", after=first(hang_events, "retry")) - stalled
    report(
        "recovery",
        {
            "kill_over_clean_wall": kill_s / clean_s,
            "hang_over_clean_wall": hang_s / clean_s,
        },
        {
            "rows": args.rows,
            "clean_s": clean_s,
            "kill_s": kill_s,
            "hang_s": hang_s,
            "kill_failure_reported_to_training_again_s": kill_recovery,
            "hang_stall_start_to_training_again_s": hang_recovery,
            "stall_timeout_s": STALL_S,
            "val/accuracy": {
                "clean": clean.metrics["val/accuracy"],
                "kill": killed.metrics["val/accuracy"],
                "hang": hung.metrics["val/accuracy"],
            },
        },
    )
    print(f"{'kill: failure → training again':>34}: {kill_recovery:.1f} s")
    print(f"{'hang: stall → training again':>34}: {hang_recovery:.1f} s (timeout {STALL_S:g} s)")


if __name__ == "__main__":
    main()
