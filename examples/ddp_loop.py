"""A hand-written DDP training loop over shards, with ``lepton_spark.distributed.run``.

The steps a user writes when the built-in pipeline's loop is not the one they want:

1. ``make_frame``: a classification DataFrame (four standard-normal features, a label from a
   linear boundary of three of them; the fourth is noise), made by Spark.
2. ``materialize``: the DataFrame as Arrow shards for that many ranks, with a train and a
   validation split (found again by fingerprint instead of written twice).
3. ``train`` on every rank: a small MLP wrapped in ``DistributedDataParallel`` (the process
   group is already up), this rank's dealt batches from ``context().loader`` each epoch, the
   mean loss and the validation accuracy summed over the ranks with ``engine.allreduce``,
   ``log_metrics`` each epoch (rank 0's go to MLflow), and ``checkpoint.save`` each epoch. It
   starts from ``checkpoint.load()``: after a retry, or when ``run`` is given the same
   ``checkpoint_dir`` again, the epochs already done are not trained again.

    python -m examples.ddp_loop --rows 100000 --epochs 5
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import cloudpickle

from lepton_spark import distributed

FEATURES = ["x0", "x1", "x2", "x3"]

# The ranks cannot import examples/ (it is not installed with lepton_spark): the functions of
# this module travel by value. Run as a script, the module is __main__, sent by value anyway.
if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_frame(spark: Any, rows: int = 20_000, seed: int = 0) -> Any:
    """``rows`` rows of ``x0..x3`` (standard normal) and ``label`` = ``x0 - 2 x1 + x2 / 2 > 0``."""
    from pyspark.sql import functions as F

    df = spark.range(rows).select(
        *(F.randn(seed + i).alias(name) for i, name in enumerate(FEATURES))
    )
    boundary = F.col("x0") - 2 * F.col("x1") + 0.5 * F.col("x2")
    return df.withColumn("label", (boundary > 0).cast("int"))


def train(shards: Any, epochs: int = 5, lr: float = 0.1, batch_size: int = 256) -> dict[str, Any]:
    """One rank's loop (run it with ``distributed.run``); rank 0's summary is ``run``'s value.

    Returns the validation accuracy after the last epoch, the epoch this attempt started at
    (from the checkpoint) and the epochs it trained.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ctx = distributed.context()
    spec = shards.manifest.feature_spec
    torch.manual_seed(0)  # the same start on every rank (DDP broadcasts rank 0's weights too)
    net = torch.nn.Sequential(
        torch.nn.Linear(len(spec.numeric), 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    ).to(ctx.device)
    state = ctx.checkpoint.load()  # None on a fresh run, else what rank 0 last saved
    if state is not None:
        net.load_state_dict(state["model"])
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    start = 0 if state is None else int(state["epoch"])
    trained: list[int] = []
    accuracy = float("nan") if state is None else float(state["accuracy"])
    for epoch in range(start, epochs):
        model.train()
        loss_sum = torch.zeros(2)  # summed loss, batches
        for batch in ctx.loader(shards, epoch, batch_size):
            loss = torch.nn.functional.cross_entropy(model(batch.numeric), batch.label)
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
            loss_sum += torch.tensor([float(loss), 1.0])
            ctx.heartbeat()
        loss_sum = ctx.engine.allreduce(loss_sum)
        accuracy = validate(ctx, net, shards, epoch)
        ctx.log_metrics(
            {"train/loss": float(loss_sum[0] / loss_sum[1]), "val/accuracy": accuracy},
            step=epoch + 1,
        )
        ctx.checkpoint.save(
            {
                "epoch": epoch + 1,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "accuracy": accuracy,
            }
        )
        trained.append(epoch)
    return {"accuracy": accuracy, "started_at": start, "trained": trained, "ranks": ctx.size}


def validate(ctx: Any, net: Any, shards: Any, epoch: int) -> float:
    """The accuracy on the whole validation split: each rank scores its share of the rows, the
    hits and the rows are summed over the ranks. (``epoch`` only keeps the rank's heartbeat
    position: ``loader`` reports the epoch it is given.)"""
    import torch

    net.eval()
    counts = torch.zeros(2)  # hits, rows
    with torch.no_grad():
        for batch in ctx.loader(shards, epoch, 1024, split="validation"):
            hits = (net(batch.numeric).argmax(1) == batch.label).sum()
            counts += torch.tensor([float(hits), float(len(batch))])
    counts = ctx.engine.allreduce(counts)
    return float(counts[0] / counts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", default=".lepton/examples/shards", help="where shards go")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="pass the same one again to resume (default: new)"
    )
    args = parser.parse_args()

    from lepton_spark.config import SparkConfig
    from lepton_spark.data.session import spark_session
    from lepton_spark.shards import materialize

    spark = spark_session(
        SparkConfig(master=f"local[{args.workers}]"), app_name="lepton-spark ddp loop"
    )
    try:
        started = time.perf_counter()
        shards = materialize(
            make_frame(spark, args.rows),
            label="label",
            numeric=FEATURES,
            root=args.root,
            num_workers=args.workers,
        )
        print(f"shards: {shards.folder} ({time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
        result = distributed.run(
            train,
            shards,
            args.epochs,
            args.lr,
            args.batch_size,
            spark=spark,
            num_workers=args.workers,
            checkpoint_dir=args.checkpoint_dir,
        )
        print(
            f"trained epochs {result['trained']} (from epoch {result['started_at']}) on "
            f"{result['ranks']} ranks in {time.perf_counter() - started:.1f} s; "
            f"validation accuracy {result['accuracy']:.4f}"
        )
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
