"""A distributed matrix multiply, C = A @ B, written with ``lepton_spark.distributed.run``.

How the data moves, and why:

* **A and B go through a folder, not through the function's arguments.** ``multiply`` writes
  them with ``np.save`` into a folder every rank reads (a temporary one on this machine by
  default; on a cluster of several hosts pass ``folder=`` on a shared file system). An array
  passed as an argument of ``run`` would be pickled into the stage's task closure and sent
  whole to every rank, A included, though each rank needs only its rows.
* **A is split by row blocks.** Rank ``r`` of ``p`` memory-maps ``A.npy`` and copies only its
  rows, ``row_block(n, r, p)``: ``n // p`` rows each and one more for the first ``n % p`` ranks,
  so any ``n`` works (a rank may get no rows when ``n < p``).
* **B is broadcast from rank 0** with ``torch.distributed.broadcast``: rank 0 reads the file,
  the others receive it over the process group (the ranks could read it from the folder too;
  the broadcast is what a rank that alone holds B would do).
* **C is gathered on rank 0** with ``torch.distributed.gather``. Gloo gathers tensors of one
  shape, so each block is padded to ``ceil(n / p)`` rows and cut back on rank 0. Rank 0 returns
  C; it reaches the driver as the stage's result (pickled, so bounded by Spark's
  ``spark.driver.maxResultSize``, 1 GiB by default). The other ranks return ``None``, so that
  only one copy of C travels.

The multiply runs in A's and B's dtype (``np.result_type``, at least float32) with torch on
the rank's device (``run``'s ``device``: the GPU when there is one, else the CPU, with as many
threads as the task has cores).

``blockmatrix_multiply`` does the same with MLlib's ``BlockMatrix`` (classic Spark only: it
needs the SparkContext), for comparison: the blocks are sent from the driver with
``parallelize``, multiplied on the executors in double precision, and collected. Most of its
time is PySpark moving the blocks into the JVM (rows of ``MatrixUDT``, a Python float per
value: 9 to 13 s per million values on a 2-core machine), not the products (Spark's Java BLAS
multiplies two 4096 x 4096 matrices in 6 to 8 s there); its ``timings`` argument says where
the time went.

    python -m examples.matmul --n 1024                # checks C against numpy, prints the times
    python -m examples.matmul --n 1024 --blockmatrix  # BlockMatrix's time too
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from lepton_spark import distributed

A_FILE = "a.npy"
B_FILE = "b.npy"

# The ranks cannot import examples/ (it is not installed with lepton_spark): the functions of
# this module travel by value. Run as a script, the module is __main__, which cloudpickle
# sends by value anyway.
if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def row_block(rows: int, rank: int, size: int) -> tuple[int, int]:
    """The ``[start, stop)`` rows of rank ``rank`` of ``size``: ``rows // size`` each, one more
    for the first ``rows % size`` ranks (``np.array_split``'s blocks)."""
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def multiply(
    spark: Any,
    a: np.ndarray,
    b: np.ndarray,
    num_workers: int = 2,
    *,
    folder: str | Path | None = None,
    device: str = "auto",
) -> np.ndarray:
    """``a @ b`` on ``num_workers`` ranks of one barrier stage (see the module docstring).

    ``folder``: where A and B are written for the ranks (default: a temporary folder on this
    machine, removed afterwards; on several hosts, a shared path every rank reads). ``device``
    is ``run``'s: ``auto``, ``cpu`` or ``cuda``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply arrays of shapes {a.shape} and {b.shape}")
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    owned = folder is None
    where = Path(tempfile.mkdtemp(prefix="lepton-matmul-")) if folder is None else Path(folder)
    try:
        where.mkdir(parents=True, exist_ok=True)
        np.save(where / A_FILE, np.asarray(a, dtype=dtype))
        np.save(where / B_FILE, np.asarray(b, dtype=dtype))
        return distributed.run(
            _multiply_on_rank,
            str(where.resolve()),
            spark=spark,
            num_workers=num_workers,
            backend="ddp",
            device=device,
        )
    finally:
        if owned:
            shutil.rmtree(where, ignore_errors=True)


def _multiply_on_rank(folder: str) -> np.ndarray | None:
    """One rank: its rows of A times B (broadcast from rank 0), gathered on rank 0."""
    import torch
    import torch.distributed as dist

    ctx = distributed.context()
    a = np.load(Path(folder) / A_FILE, mmap_mode="r")  # the header, and only the rows read
    rows = a.shape[0]
    start, stop = row_block(rows, ctx.rank, ctx.size)
    block = torch.from_numpy(np.array(a[start:stop])).to(ctx.device)
    b_shape = np.load(Path(folder) / B_FILE, mmap_mode="r").shape  # every rank needs the shape
    b = torch.empty(b_shape, dtype=block.dtype, device=ctx.device)
    if ctx.rank == 0:
        b.copy_(torch.from_numpy(np.load(Path(folder) / B_FILE)))
    dist.broadcast(b, src=0)
    product = block @ b
    # gather takes one shape from every rank: pad to the longest block, cut back on rank 0
    padded = torch.zeros((math.ceil(rows / ctx.size), b.shape[1]), dtype=b.dtype, device=b.device)
    padded[: stop - start] = product
    parts = [torch.empty_like(padded) for _ in range(ctx.size)] if ctx.rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    blocks = [part[: len(range(*row_block(rows, r, ctx.size)))] for r, part in enumerate(parts)]
    return torch.cat(blocks).cpu().numpy()


def blockmatrix_multiply(
    spark: Any,
    a: np.ndarray,
    b: np.ndarray,
    block: int = 1024,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """``a @ b`` with MLlib's ``BlockMatrix`` in ``block`` x ``block`` blocks (the edge blocks
    smaller), in float64; classic Spark only.

    The inputs are cached once in the JVM (``multiply`` reads its operands' blocks twice: once
    for their sizes, once for the product), each step forced with ``validate()``, so that
    ``timings`` (when given) gets each step's seconds: ``to_jvm`` (the blocks from Python into
    the JVM: PySpark sends them as DataFrame rows of ``MatrixUDT``, a Python float per value),
    ``multiply`` (the shuffle and the block products, in the JVM) and ``collect`` (C's blocks
    back to Python). The cached blocks are released by Spark's ContextCleaner once unused.
    """
    from pyspark.mllib.linalg.distributed import BlockMatrix

    from lepton_spark.sparkinfo import is_connect

    if is_connect(spark):
        raise ValueError("BlockMatrix is an RDD API: it needs classic Spark, not Spark Connect")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply arrays of shapes {a.shape} and {b.shape}")
    sc = spark.sparkContext
    times = timings if timings is not None else {}

    def distributed_matrix(m: np.ndarray) -> BlockMatrix:
        blocks = _blocks(np.asarray(m, dtype=np.float64), block)
        rdd = sc.parallelize(blocks, min(len(blocks), sc.defaultParallelism))
        matrix = BlockMatrix(rdd, block, block, m.shape[0], m.shape[1]).cache()
        matrix.validate()  # a job over every block: they are in the JVM's cache now
        return matrix

    started = time.perf_counter()
    left, right = distributed_matrix(a), distributed_matrix(b)
    times["to_jvm"] = time.perf_counter() - started
    started = time.perf_counter()
    product = left.multiply(right).cache()
    product.validate()
    times["multiply"] = time.perf_counter() - started
    started = time.perf_counter()
    c = np.empty((a.shape[0], b.shape[1]), dtype=np.float64)
    for (i, j), m in product.blocks.collect():
        c[i * block : i * block + m.numRows, j * block : j * block + m.numCols] = m.toArray()
    times["collect"] = time.perf_counter() - started
    return c


def _blocks(m: np.ndarray, block: int) -> list[tuple[tuple[int, int], Any]]:
    """``((i, j), DenseMatrix)`` for every block of ``m`` (MLlib's matrices are column-major)."""
    from pyspark.mllib.linalg import Matrices

    out = []
    for i in range(math.ceil(m.shape[0] / block)):
        for j in range(math.ceil(m.shape[1] / block)):
            part = m[i * block : (i + 1) * block, j * block : (j + 1) * block]
            out.append(((i, j), Matrices.dense(*part.shape, part.ravel(order="F"))))
    return out


def tolerance(dtype: Any, inner: int) -> float:
    """The absolute error allowed against numpy: 16 roundings of a length-``inner`` dot
    product of unit-sized numbers (two BLAS libraries sum in different orders)."""
    return 16 * float(np.finfo(dtype).eps) * inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="A is n x k, B is k x m")
    parser.add_argument("--k", type=int, default=None, help="default: n")
    parser.add_argument("--m", type=int, default=None, help="default: n")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blockmatrix", action="store_true", help="time BlockMatrix too")
    parser.add_argument("--block", type=int, default=1024, help="BlockMatrix's block size")
    parser.add_argument(
        "--driver-memory", default="4g", help="the local JVM's heap (BlockMatrix needs it)"
    )
    args = parser.parse_args()

    from lepton_spark.config import SparkConfig
    from lepton_spark.data.session import spark_session

    k, m = args.k or args.n, args.m or args.n
    rng = np.random.default_rng(args.seed)
    a = rng.standard_normal((args.n, k)).astype(args.dtype)
    b = rng.standard_normal((k, m)).astype(args.dtype)
    spark = spark_session(
        SparkConfig(
            master=f"local[{args.workers}]", conf={"spark.driver.memory": args.driver_memory}
        ),
        app_name="lepton-spark matmul",
    )
    try:
        started = time.perf_counter()
        expected = a @ b
        print(f"numpy      : {time.perf_counter() - started:8.2f} s (this process)")
        started = time.perf_counter()
        c = multiply(spark, a, b, num_workers=args.workers)
        seconds = time.perf_counter() - started
        error = float(np.abs(c - expected).max())
        ok = error <= tolerance(args.dtype, k)
        print(f"multiply   : {seconds:8.2f} s on {args.workers} ranks, max |error| {error:.2e}")
        if args.blockmatrix:
            started = time.perf_counter()
            c = blockmatrix_multiply(spark, a, b, block=args.block)
            seconds = time.perf_counter() - started
            error = float(np.abs(c - expected).max())
            ok = ok and error <= tolerance(args.dtype, k)
            print(f"BlockMatrix: {seconds:8.2f} s, max |error| {error:.2e}")
    finally:
        spark.stop()
    if not ok:
        raise SystemExit(f"C differs from numpy's by more than {tolerance(args.dtype, k):.2e}")
    print(f"{args.n} x {k} @ {k} x {m} ({args.dtype}): equal to numpy's")


if __name__ == "__main__":
    main()
