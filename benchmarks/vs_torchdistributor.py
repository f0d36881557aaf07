"""Launch of an empty DDP training function: Spark's ``TorchDistributor`` against lepton-spark's
barrier stage with ``train.backend: ddp`` (2 ranks, ``local[2]``, alternating; the first call of
each is reported apart as the cold one). Goal: ours ≤ 1.0× its time.

The end-to-end comparison the engines issue also asks for (the DataFrame saved as Parquet, a torch
``DataLoader`` over it in the training function, to the same validation accuracy) is not written
yet.

    python -m benchmarks.vs_torchdistributor     # writes results/vs_torchdistributor.json
"""

from __future__ import annotations

import argparse

from benchmarks._common import report
from benchmarks.launch import alternate, ours
from lepton_spark.config import SparkConfig
from lepton_spark.data.session import spark_session


def empty_ddp() -> float:
    """What a TorchDistributor user's function does: the process group up, one allreduce."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        value = torch.ones(1)
        dist.all_reduce(value)
        return float(value[0])
    finally:
        dist.destroy_process_group()


def theirs() -> float:
    import time

    from pyspark.ml.torch.distributor import TorchDistributor

    started = time.perf_counter()
    result = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(empty_ddp)
    assert result == 2.0, result
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    spark = spark_session(SparkConfig(master="local[2]"), app_name="lepton-spark launch")
    seconds, warm = alternate(
        args.rounds, {"lepton_ddp": lambda: ours(spark, "ddp"), "torchdistributor": theirs}
    )
    spark.stop()
    report(
        "vs_torchdistributor",
        {
            "launch_ours_over_torchdistributor_warm": warm["lepton_ddp"] / warm["torchdistributor"],
            "launch_ours_over_torchdistributor_cold": seconds["lepton_ddp"][0]
            / seconds["torchdistributor"][0],
        },
        {"seconds": seconds, "rounds": args.rounds},
    )


if __name__ == "__main__":
    main()
