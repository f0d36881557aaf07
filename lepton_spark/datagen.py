"""A synthetic classification table, generated on Spark, whose best possible accuracy is known.

Eight numeric columns ``x0..x7`` (standard normal; ``x6`` and ``x7`` are noise), two categorical
string columns ``cat_a`` (12 levels) and ``cat_b`` (6 levels), and a binary ``label``::

    score = 1.5 sin(1.5 x0) + x1 x2 + 0.8 (x3² - 1) - 0.6 x4 + w_a[cat_a] + w_b[cat_b] x5
    label = [score > 0], flipped with probability ``label_noise``

The clean label is a deterministic function of the features, so the Bayes accuracy (the best any
model can do) is exactly ``1 - label_noise``. Columns are a function of ``seed`` and the row id
only, so the same config gives the same table whatever the partitioning.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lepton_spark.config import GeneratedSource

CAT_A_WEIGHTS = [-1.6, -1.2, -0.9, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 0.9, 1.2, 1.6]
CAT_B_WEIGHTS = [-1.5, -0.8, -0.2, 0.2, 0.8, 1.5]
NUMERIC = [f"x{i}" for i in range(8)]
CATEGORICAL = ["cat_a", "cat_b"]


def bayes_accuracy(source: GeneratedSource) -> float:
    """The best accuracy any classifier can reach on this table."""
    return 1.0 - source.label_noise


def _uniform(seed: int, salt: int) -> Column:
    """A uniform [0, 1) value from (seed, salt, id) only: independent of partitioning."""
    bits = F.xxhash64(F.lit(seed), F.lit(salt), F.col("id"))
    return (F.abs(bits % (1 << 52))).cast("double") / float(1 << 52)


def _normal(seed: int, salt: int) -> Column:
    """Box–Muller from two hashed uniforms."""
    u1 = F.greatest(_uniform(seed, 2 * salt), F.lit(1e-12))
    u2 = _uniform(seed, 2 * salt + 1)
    return F.sqrt(-2.0 * F.log(u1)) * F.cos(2.0 * 3.141592653589793 * u2)


def _pick(index: Column, values: list) -> Column:
    return F.element_at(F.array(*[F.lit(v) for v in values]), index + 1)


def generate(spark: SparkSession, source: GeneratedSource) -> DataFrame:
    """The table described in the module docstring, ``source.rows`` rows."""
    seed = source.seed
    partitions = source.partitions or max(spark.sparkContext.defaultParallelism, 2)
    df = spark.range(0, source.rows, numPartitions=partitions)
    for i, name in enumerate(NUMERIC):
        df = df.withColumn(name, _normal(seed, i))
    a_idx = F.floor(_uniform(seed, 100) * len(CAT_A_WEIGHTS)).cast("int")
    b_idx = F.floor(_uniform(seed, 101) * len(CAT_B_WEIGHTS)).cast("int")
    df = (
        df.withColumn("_a", a_idx)
        .withColumn("_b", b_idx)
        .withColumn("cat_a", F.format_string("a%02d", F.col("_a")))
        .withColumn("cat_b", F.format_string("b%d", F.col("_b")))
    )
    x = {n: F.col(n) for n in NUMERIC}
    score = (
        1.5 * F.sin(1.5 * x["x0"])
        + x["x1"] * x["x2"]
        + 0.8 * (x["x3"] * x["x3"] - 1.0)
        - 0.6 * x["x4"]
        + _pick(F.col("_a"), CAT_A_WEIGHTS)
        + _pick(F.col("_b"), CAT_B_WEIGHTS) * x["x5"]
    )
    clean = (score > 0).cast("int")
    flip = (_uniform(seed, 200) < source.label_noise).cast("int")
    df = df.withColumn("label", F.abs(clean - flip))
    return df.select("id", *NUMERIC, *CATEGORICAL, "label")
