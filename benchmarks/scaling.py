"""Data-parallel speed-up: 1 rank against 2 Horovod ranks on the same global workload.

A compute-bound MLP (25→1024→1024→2), one torch thread per rank, the same global batch and number
of steps; ranks run in a real Spark barrier stage (``local[2]``) with Horovod over Gloo. The time
compared is each run's training loop (``epoch_seconds``, rank 0), medians over rounds.

    python -m benchmarks.scaling             # writes results/scaling.json
"""

from __future__ import annotations

import argparse
import functools

from benchmarks._common import SPEC, WORK, committed, median, report, synthetic_table
from lepton_spark.cluster.stage import run_barrier
from lepton_spark.config import ModelConfig, SparkConfig, TrainConfig
from lepton_spark.data.session import spark_session
from lepton_spark.shards.local import write_local_shards
from lepton_spark.training.job import TrainSpec
from lepton_spark.training.worker import train_rank

HEAVY_MODEL = ModelConfig(hidden=[1024, 1024], embedding_dim=8)


def shards(rows: int) -> str:
    folder = WORK / "bench" / f"scaling-{rows}"
    if committed(folder) is None:
        half = rows // 2
        write_local_shards(
            folder,
            {
                "train": [synthetic_table(half, 1), synthetic_table(half, 2)],
                "validation": [synthetic_table(2_048, 3), synthetic_table(2_048, 4)],
            },
            SPEC,
        )
    return str(folder)


def run(spark, folder: str, ranks: int, global_batch: int) -> float:
    cfg = TrainConfig(
        num_workers=ranks,
        epochs=1,
        batch_size=global_batch // ranks,
        threads_per_rank=1,
        shuffle=True,
        lr_scaling="none",
        progress_every_steps=10_000,
    )
    spec = TrainSpec(shard_folder=folder, train=cfg, model=HEAVY_MODEL, verify_shards=False)
    results = run_barrier(spark, functools.partial(train_rank, spec), ranks)
    return results[0].history[0]["train/epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--global-batch", type=int, default=8_192)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    folder = shards(args.rows)
    spark = spark_session(SparkConfig(master="local[2]"), app_name="lepton-spark scaling")
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for ranks in (1, 2):
            seconds[ranks].append(run(spark, folder, ranks, args.global_batch))
            print(f"{ranks} rank(s): {seconds[ranks][-1]:.2f} s", flush=True)
    spark.stop()
    report(
        "scaling",
        {"speedup_2_ranks": median(seconds[1]) / median(seconds[2])},
        {
            "rows": args.rows,
            "global_batch": args.global_batch,
            "model_hidden": HEAVY_MODEL.hidden,
            "seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
