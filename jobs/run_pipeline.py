"""spark-submit entry point for a pipeline.

    spark-submit --master local[2] jobs/run_pipeline.py pipelines/tabular_demo.yaml \
        [--tracking-uri URI] [--set train.epochs=2 ...]

The session comes from spark-submit (its ``--master`` and ``--conf`` win over the pipeline's
``spark`` section); everything else is the same ``run_pipeline`` the CLI calls.
"""

from __future__ import annotations

import argparse
import sys

from pyspark.sql import SparkSession

from lepton_spark.config import load_config, parse_override
from lepton_spark.pipeline import run_pipeline


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/run_pipeline.py")
    parser.add_argument("pipeline")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.pipeline, dict(parse_override(s) for s in args.overrides))
    spark = SparkSession.builder.appName(f"lepton-spark {cfg.name}").getOrCreate()
    result = run_pipeline(cfg, spark=spark, tracking_uri=args.tracking_uri)
    print(f"run {result.run_id}: {result.metrics}")
    print(f"model {result.model_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
