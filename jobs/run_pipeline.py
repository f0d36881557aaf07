"""spark-submit entry point for a pipeline.

    spark-submit --master spark://HOST:7077 --py-files dist/lepton_spark-0.2.0-py3-none-any.whl \
        jobs/run_pipeline.py pipelines/tabular_demo.yaml \
        [--run-key 2026-11-22] [--force] [--tracking-uri URI] [--set train.epochs=2 ...]

The session comes from spark-submit (its ``--master`` and ``--conf`` win over the pipeline's
``spark`` section); everything else is the same ``run_pipeline`` the CLI calls, with the same exit
codes (:mod:`lepton_spark.errors`: 0 done or already done, 2 bad input, 3 training failed,
4 infrastructure, 130 interrupted), so a scheduler can tell a retry from a fix.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from lepton_spark.cluster import interrupts
from lepton_spark.errors import EXIT_OK, InfrastructureError, InputError, exit_code
from lepton_spark.redact import redact_text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/run_pipeline.py")
    parser.add_argument("pipeline")
    parser.add_argument("--run-key", default=None, help="idempotent scheduled runs: the run date")
    parser.add_argument("--force", action="store_true", help="with --run-key: run again anyway")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    interrupts.install(signal.SIGTERM)  # the MLflow run KILLED, the Spark jobs cancelled

    from lepton_spark.config import load_config, parse_override
    from lepton_spark.data.session import submitted_session
    from lepton_spark.errors import BarrierError

    try:
        cfg = load_config(args.pipeline, dict(parse_override(s) for s in args.overrides))
        from lepton_spark.pipeline.run import run_pipeline

        # The session is made only when needed: a finished run key needs no Spark at all.
        result = run_pipeline(
            cfg,
            spark=lambda: submitted_session(cfg.spark, f"lepton-spark {cfg.name}"),
            tracking_uri=args.tracking_uri,
            run_key=args.run_key,
            force=args.force,
        )
    except (InputError, InfrastructureError, BarrierError, KeyboardInterrupt) as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return exit_code(err)
    if result.outcome == "already_finished":
        print(f"run key {args.run_key}: finished already in run {result.run_id}; nothing to do")
    print(f"run {result.run_id} ({result.outcome}): {result.metrics}")
    print(f"model {result.model_uri}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
