"""Launch of an empty Horovod function: ``horovod.spark.run`` against lepton-spark's barrier
stage with ``train.backend: horovod`` (2 ranks, ``local[2]``, alternating; the first call of
each is reported apart as the cold one). Goal: ours ≤ 0.4× its time; a user's function under
``lepton_spark.distributed.run(fn, backend="horovod")`` (``hvd.init()`` left out) ≤ 0.5×.

    python -m benchmarks.vs_horovod_run     # writes results/vs_horovod_run.json
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import report
from benchmarks.launch import alternate, breakdown, ours, run_fn
from lepton_spark.config import SparkConfig
from lepton_spark.data.session import spark_session


def empty_horovod() -> float:
    import horovod.torch as hvd
    import torch

    hvd.init()
    try:
        return float(hvd.allreduce(torch.ones(1), op=hvd.Sum)[0])
    finally:
        hvd.shutdown()


def theirs() -> float:
    import horovod.spark

    started = time.perf_counter()
    result = horovod.spark.run(empty_horovod, num_proc=2, verbose=0)
    assert result == [2.0, 2.0], result
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    spark = spark_session(SparkConfig(master="local[2]"), app_name="lepton-spark launch")
    seconds, warm = alternate(
        args.rounds,
        {
            "lepton_horovod": lambda: ours(spark, "horovod"),
            "lepton_run_fn_horovod": lambda: run_fn(spark, "horovod"),
            "horovod_spark_run": theirs,
        },
    )
    steps = breakdown(spark, "horovod")  # where our launch goes, warm
    for name, value in steps.items():
        print(f"  ours, {name}: {value:.2f} s", flush=True)
    spark.stop()
    report(
        "vs_horovod_run",
        {
            "launch_ours_over_horovod_run_warm": warm["lepton_horovod"] / warm["horovod_spark_run"],
            "launch_ours_over_horovod_run_cold": seconds["lepton_horovod"][0]
            / seconds["horovod_spark_run"][0],
            "launch_run_fn_over_horovod_run_warm": warm["lepton_run_fn_horovod"]
            / warm["horovod_spark_run"],
        },
        {"seconds": seconds, "rounds": args.rounds, "ours_breakdown_s": steps},
    )


if __name__ == "__main__":
    main()
