"""Write a table to score: the demo's columns for new rows ("tomorrow's data"), with an ``id``.

    .venv/bin/python jobs/demo_table.py tomorrow.parquet [--rows 1000000] [--seed 8]

The rows come from the demo pipeline's generator and SQL transform with another seed, without the
label: the input ``lepton-spark score`` expects from the demo's model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyspark.sql import functions as F

from lepton_spark.config import load_config
from lepton_spark.data.session import spark_session
from lepton_spark.data.sources import load_and_transform

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="Parquet folder to write")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    cfg = load_config(
        ROOT / "pipelines" / "tabular_demo.yaml",
        {"sources.events.generate.rows": args.rows, "sources.events.generate.seed": args.seed},
    )
    spark = spark_session(cfg.spark, app_name="lepton-spark demo table")
    table = load_and_transform(spark, cfg).drop(cfg.features.label)
    table.withColumn("id", F.monotonically_increasing_id()).write.parquet(args.output)
    print(f"wrote {args.rows:,} rows to {args.output}")
    spark.stop()


if __name__ == "__main__":
    main()
