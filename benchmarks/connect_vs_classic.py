"""The demo pipeline over Spark Connect against classic Spark, side by side.

Both on local[2] on this machine: classic Spark in the driver process, and a Spark Connect server
started from the pyspark install on 127.0.0.1 with lepton-spark as its client. Each measurement
runs in a fresh interpreter of its own (one interpreter holds one kind of session), the two
kinds alternating: the barrier stage's launch (an empty function on 2 ranks, the second of two
calls) and the demo pipeline end to end on generated rows, shards written afresh.
Printed: Connect's wall time over classic's (goal ≤ 1.15) and the launch time of each.

    python -m benchmarks.connect_vs_classic [--rows 200000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import median, report, run_json

ROOT = Path(__file__).resolve().parents[1]


def empty(ctx: object) -> int:
    return 0


def child(mode: str, url: str, rows: int, work: Path) -> None:
    """One measurement in this interpreter: launch time, then the pipeline's wall time."""
    from lepton_spark import run_pipeline
    from lepton_spark.cluster.stage import run_barrier
    from lepton_spark.config import SparkConfig, load_config
    from lepton_spark.data.session import spark_session

    spark_cfg = SparkConfig(master="local[2]", remote=url if mode == "connect" else None)
    spark = spark_session(spark_cfg, app_name=f"bench {mode}")
    launches = []
    for _ in range(2):
        started = time.perf_counter()
        run_barrier(spark, empty, 2)
        launches.append(time.perf_counter() - started)
    cfg = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {
            "sources.events.generate.rows": rows,
            "train.epochs": 2,
            "shards.root": str(work / mode / "shards"),
            "train.checkpoint_root": str(work / mode / "checkpoints"),
            "tracking.local_store": str(work / mode / "mlruns-data"),
            "tracking.registered_model": None,
            "tracking.system_metrics_interval_s": None,
        },
    )
    started = time.perf_counter()
    result = run_pipeline(cfg, spark=spark, progress=lambda e: None, rebuild_shards=True)
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "launch_s": launches[-1],
                "first_launch_s": launches[0],
                "pipeline_s": wall,
                "timings": result.timings,
                "val_accuracy": result.metrics["val/accuracy"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("classic", "connect"))
    parser.add_argument("--url", default="")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, args.rows, Path(args.work))
        return
    from lepton_spark.cluster.connect_server import ConnectServer

    work = Path(tempfile.mkdtemp(prefix="lepton-connect-bench-"))
    results: dict[str, list[dict]] = {"classic": [], "connect": []}
    with ConnectServer(folder=work / "server", master="local[2]") as server:
        for i in range(args.rounds):
            for mode in ("classic", "connect"):
                command = [sys.executable, "-m", "benchmarks.connect_vs_classic"]
                command += ["--child", mode, "--url", server.url, "--work", str(work)]
                command += ["--rows", str(args.rows)]
                results[mode].append(run_json(command))
                print(f"round {i + 1} {mode}: {results[mode][-1]}")
    wall = {mode: median([r["pipeline_s"] for r in runs]) for mode, runs in results.items()}
    launch = {mode: median([r["launch_s"] for r in runs]) for mode, runs in results.items()}
    report(
        "connect_vs_classic",
        {
            "connect_over_classic": wall["connect"] / wall["classic"],
            "launch_s_classic": launch["classic"],
            "launch_s_connect": launch["connect"],
        },
        {"rows": args.rows, "runs": results},
    )


if __name__ == "__main__":
    main()
