"""The DataFrame both sides of ``vs_petastorm`` start from (needs only pyspark: it is imported by
the main environment and by the Petastorm one)."""

from __future__ import annotations

import os
import sys


def local_spark(app: str, **conf: str):
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    builder = (
        SparkSession.builder.master("local[2]")
        .appName(app)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "2g")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def make_frame(spark, rows: int):
    """The demo's shape: x0..x8 float, cat_a/cat_b long indices, label long; cached and counted."""
    from pyspark.sql import functions as F

    df = spark.range(0, rows, 1, numPartitions=4)
    for i in range(9):
        df = df.withColumn(f"x{i}", F.randn(seed=i).cast("float"))
    df = (
        df.withColumn("cat_a", (F.rand(seed=100) * 13).cast("long"))
        .withColumn("cat_b", (F.rand(seed=101) * 7).cast("long"))
        .withColumn("label", (F.col("x0") + F.col("x1") * F.col("x2") > 0).cast("long"))
        .drop("id")
        .cache()
    )
    df.count()
    return df
