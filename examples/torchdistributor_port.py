"""A training function written for Spark's ``TorchDistributor``, moved to
``lepton_spark.distributed.run`` by removing its ``init_process_group`` call.

The function is the one a TorchDistributor user has: each rank reads its share of a Parquet
folder with pyarrow (every ``size``-th file from its ``rank``), trains a small MLP in
``DistributedDataParallel`` with SGD, and returns the validation accuracy summed over the
ranks with ``all_reduce``. Everything but the process group is in :func:`loop`:

* ``train_for_torchdistributor`` = ``dist.init_process_group("gloo")`` + ``loop`` +
  ``dist.destroy_process_group()``, for ``TorchDistributor(...).run``;
* ``train_for_lepton`` = ``loop``, for ``distributed.run(..., backend="ddp")``, which brings
  the process group up before the function starts and down after it.

The same for Horovod: ``train_for_horovod_spark`` = ``hvd.init()`` + ``horovod_loop`` +
``hvd.shutdown()`` for ``horovod.spark.run``, ``train_for_lepton_horovod`` = ``horovod_loop``
for ``distributed.run(..., backend="horovod")``.

With the same data, seed and ranks, the launchers give the same accuracy
(``tests/examples/test_examples.py`` checks it).

    python -m examples.torchdistributor_port --rows 20000 --epochs 3   # add --horovod
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle

FEATURES = ["x0", "x1", "x2", "x3"]

# The ranks cannot import examples/ (it is not installed with lepton_spark): the functions of
# this module travel by value. distributed.run and horovod.spark.run pickle with cloudpickle;
# TorchDistributor with Spark's own copy of it, pyspark.cloudpickle, which keeps its own list.
# Run as a script, the module is __main__, sent by value anyway.
if __name__ != "__main__":
    from pyspark import cloudpickle as spark_cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spark_cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write_parquet(spark: Any, folder: str | Path, rows: int = 4000, files: int = 4) -> str:
    """``folder/train`` (``rows`` rows) and ``folder/validation`` (``rows // 4``), ``files``
    Parquet files each: ``x0..x3`` standard normal, ``label`` = ``x0 - 2 x1 + x2 / 2 > 0``
    (``x3`` is noise). The same rows for the same arguments. Returns ``folder``."""
    from pyspark.sql import functions as F

    for split, count, seed in (("train", rows, 0), ("validation", rows // 4, 100)):
        df = spark.range(0, count, 1, files).select(
            *(F.randn(seed + i).alias(name) for i, name in enumerate(FEATURES))
        )
        boundary = F.col("x0") - 2 * F.col("x1") + 0.5 * F.col("x2")
        df = df.withColumn("label", (boundary > 0).cast("int"))
        df.write.mode("overwrite").parquet(f"{folder}/{split}")
    return str(folder)


def read_share(folder: str, split: str, rank: int, size: int) -> tuple[Any, Any]:
    """This rank's rows of ``split``: every ``size``-th Parquet file from the ``rank``-th (in
    name order), as a float32 feature tensor and an int64 label tensor."""
    import glob
    import os

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    files = sorted(glob.glob(os.path.join(folder, split, "*.parquet")))[rank::size]
    if not files:
        raise ValueError(f"rank {rank} of {size}: no Parquet file of {folder}/{split} is left")
    table = pq.ParquetDataset(files).read(columns=[*FEATURES, "label"])
    x = np.stack([table[c].to_numpy() for c in FEATURES], 1).astype(np.float32)
    y = table["label"].to_numpy().astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def make_net() -> Any:
    """The MLP, the same weights on every rank and every launcher (seed 0)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(len(FEATURES), 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )


def loop(parquet_folder: str, epochs: int = 3, lr: float = 0.1, batch_size: int = 64) -> float:
    """Everything of the TorchDistributor function but the process group: this rank's share of
    the Parquet files, the MLP in DDP, SGD, the validation accuracy over every rank."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, size = dist.get_rank(), dist.get_world_size()
    x, y = read_share(parquet_folder, "train", rank, size)
    model = DistributedDataParallel(make_net())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    # Every rank must take as many steps (DDP waits for the others' gradients): the fewest.
    steps = torch.tensor([len(y) // batch_size])
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    order = torch.Generator().manual_seed(1000 + rank)
    for _epoch in range(epochs):
        model.train()
        rows = torch.randperm(len(y), generator=order)
        for step in range(int(steps[0])):
            batch = rows[step * batch_size : (step + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
    x_val, y_val = read_share(parquet_folder, "validation", rank, size)
    model.eval()
    with torch.no_grad():
        hits = float((model.module(x_val).argmax(1) == y_val).sum())
    counts = torch.tensor([hits, float(len(y_val))])
    dist.all_reduce(counts)  # hits and rows summed over the ranks
    return float(counts[0] / counts[1])


def train_for_torchdistributor(
    parquet_folder: str, epochs: int = 3, lr: float = 0.1, batch_size: int = 64
) -> float:
    """For ``TorchDistributor(...).run``: the process group is the function's own job."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return loop(parquet_folder, epochs, lr, batch_size)
    finally:
        dist.destroy_process_group()


def train_for_lepton(
    parquet_folder: str, epochs: int = 3, lr: float = 0.1, batch_size: int = 64
) -> float:
    """For ``distributed.run(..., backend="ddp")``: the process group is already up."""
    return loop(parquet_folder, epochs, lr, batch_size)


def horovod_loop(
    parquet_folder: str, epochs: int = 3, lr: float = 0.1, batch_size: int = 64
) -> float:
    """:func:`loop` written for Horovod: ``DistributedOptimizer`` instead of DDP, rank 0's
    weights broadcast, ``hvd.allreduce`` for the step count and the accuracy."""
    import horovod.torch as hvd
    import torch

    rank, size = hvd.rank(), hvd.size()
    x, y = read_share(parquet_folder, "train", rank, size)
    net = make_net()
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9),
        named_parameters=net.named_parameters(),
    )
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    steps = hvd.allreduce(torch.tensor([len(y) // batch_size]), op=hvd.Min, name="steps")
    order = torch.Generator().manual_seed(1000 + rank)
    for _epoch in range(epochs):
        net.train()
        rows = torch.randperm(len(y), generator=order)
        for step in range(int(steps[0])):
            batch = rows[step * batch_size : (step + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # Horovod averages the gradients over the ranks here
    x_val, y_val = read_share(parquet_folder, "validation", rank, size)
    net.eval()
    with torch.no_grad():
        hits = float((net(x_val).argmax(1) == y_val).sum())
    counts = hvd.allreduce(torch.tensor([hits, float(len(y_val))]), op=hvd.Sum, name="counts")
    return float(counts[0] / counts[1])


def train_for_horovod_spark(
    parquet_folder: str, epochs: int = 3, lr: float = 0.1, batch_size: int = 64
) -> float:
    """For ``horovod.spark.run``: ``hvd.init()`` is the function's own job."""
    import horovod.torch as hvd

    hvd.init()
    try:
        return horovod_loop(parquet_folder, epochs, lr, batch_size)
    finally:
        hvd.shutdown()


def train_for_lepton_horovod(
    parquet_folder: str, epochs: int = 3, lr: float = 0.1, batch_size: int = 64
) -> float:
    """For ``distributed.run(..., backend="horovod")``: Horovod is already initialised."""
    return horovod_loop(parquet_folder, epochs, lr, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4, help="Parquet files per split")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default=".lepton/examples/parquet", help="the Parquet data")
    parser.add_argument("--horovod", action="store_true", help="horovod.spark.run beside too")
    args = parser.parse_args()

    from pyspark.ml.torch.distributor import TorchDistributor

    from lepton_spark import distributed
    from lepton_spark.config import SparkConfig
    from lepton_spark.data.session import spark_session

    spark = spark_session(
        SparkConfig(master=f"local[{args.workers}]"), app_name="lepton-spark torchdistributor port"
    )
    try:
        folder = write_parquet(spark, Path(args.folder).resolve(), args.rows, args.files)
        params = (folder, args.epochs, args.lr)
        runs: dict[str, Any] = {
            "TorchDistributor": lambda: TorchDistributor(
                num_processes=args.workers, local_mode=False, use_gpu=False
            ).run(train_for_torchdistributor, *params),
            "distributed.run, ddp": lambda: distributed.run(
                train_for_lepton, *params, spark=spark, num_workers=args.workers, backend="ddp"
            ),
        }
        if args.horovod:
            import horovod.spark

            runs["horovod.spark.run"] = lambda: horovod.spark.run(
                train_for_horovod_spark, args=params, num_proc=args.workers, verbose=0
            )[0]
            runs["distributed.run, horovod"] = lambda: distributed.run(
                train_for_lepton_horovod,
                *params,
                spark=spark,
                num_workers=args.workers,
                backend="horovod",
            )
        for name, launch in runs.items():
            started = time.perf_counter()
            accuracy = launch()
            seconds = time.perf_counter() - started
            print(f"{name}: validation accuracy {accuracy:.4f} in {seconds:.1f} s")
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
