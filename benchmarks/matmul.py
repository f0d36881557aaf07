"""The distributed matmul of ``examples/matmul.py`` against MLlib's ``BlockMatrix.multiply``,
on the same ``n x n`` float64 matrices, 2 ranks / 2 executor cores on ``local[2]``.

Both sides are timed from numpy arrays on the driver to the numpy product on the driver:
ours writes A and B to a folder, runs one barrier stage (process group, A's row blocks, B
broadcast, C gathered on rank 0) and returns C; BlockMatrix's ``parallelize``s the blocks,
multiplies (its shuffle included) and collects C's blocks. A small multiply of each side runs
first, not counted (Spark's Python workers and the JVM's code warm); then ``rounds`` rounds,
the sides alternating. Every product is checked against numpy's. The ratio is BlockMatrix's
median time over ours (above 1: ours is faster). BlockMatrix's steps (the blocks into the JVM,
the multiply, C back) are recorded too: most of its time is the first.

    python -m benchmarks.matmul                 # n=4096, 2 rounds: results/matmul.json
    python -m benchmarks.matmul --n 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._common import median, report
from examples.matmul import blockmatrix_multiply, multiply, tolerance
from lepton_spark.config import SparkConfig
from lepton_spark.data.session import spark_session


def timed_product(
    fn: Callable[[], np.ndarray], expected: np.ndarray, inner: int
) -> tuple[float, float]:
    """Seconds ``fn`` takes, and its largest error against ``expected`` (checked)."""
    started = time.perf_counter()
    c = fn()
    seconds = time.perf_counter() - started
    error = float(np.abs(c - expected).max())
    assert error <= tolerance(np.float64, inner), f"max |error| {error:.3e}"
    return seconds, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block", type=int, default=1024, help="BlockMatrix's block size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--driver-memory",
        default="8g",
        help="the local JVM's heap: BlockMatrix runs out of Spark's default 1g at n=4096",
    )
    args = parser.parse_args()

    workers = 2
    spark = spark_session(
        SparkConfig(master=f"local[{workers}]", conf={"spark.driver.memory": args.driver_memory}),
        app_name="lepton-spark matmul",
    )
    rng = np.random.default_rng(args.seed)
    small = rng.standard_normal((256, 256))
    a, b = rng.standard_normal((args.n, args.n)), rng.standard_normal((args.n, args.n))
    started = time.perf_counter()
    expected = a @ b
    numpy_seconds = time.perf_counter() - started
    last_steps: dict[str, float] = {}  # BlockMatrix's steps in its last call

    def blockmatrix_side(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        last_steps.clear()
        return blockmatrix_multiply(spark, x, y, block=args.block, timings=last_steps)

    sides: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "multiply": lambda x, y: multiply(spark, x, y, num_workers=workers, device="cpu"),
        "blockmatrix": blockmatrix_side,
    }
    warmup: dict[str, float] = {}
    for name, side in sides.items():  # not counted
        warmup[name] = timed_product(lambda s=side: s(small, small), small @ small, 256)[0]
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    errors: dict[str, float] = {}
    steps: dict[str, list[dict[str, float]]] = {"blockmatrix": []}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            took, errors[name] = timed_product(lambda s=sides[name]: s(a, b), expected, args.n)
            seconds[name].append(took)
            print(f"{name}: {took:.2f} s (n={args.n})", flush=True)
            if name == "blockmatrix":
                steps[name].append(dict(last_steps))
                print(f"  {', '.join(f'{k} {v:.2f} s' for k, v in steps[name][-1].items())}")
    spark.stop()
    ours, theirs = median(seconds["multiply"]), median(seconds["blockmatrix"])
    details: dict[str, Any] = {
        "n": args.n,
        "rounds": args.rounds,
        "workers": workers,
        "dtype": "float64",
        "blockmatrix_block": args.block,
        "driver_memory": args.driver_memory,
        "seconds": seconds,
        "median_seconds": {"multiply": ours, "blockmatrix": theirs},
        "blockmatrix_steps_seconds": steps["blockmatrix"],
        "warmup_seconds_n256": warmup,
        "max_abs_error_vs_numpy": errors,
        "numpy_seconds_one_process": numpy_seconds,
    }
    report("matmul", {"blockmatrix_over_multiply_seconds": theirs / ours}, details)
    print(f"{'multiply median':>34}: {ours:.2f} s")
    print(f"{'BlockMatrix median':>34}: {theirs:.2f} s")


if __name__ == "__main__":
    main()
