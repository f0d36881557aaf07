"""lepton-spark: train PyTorch models on data that lives in Spark.

``run_pipeline`` and ``load_config`` are the front door; they are imported lazily so that the
per-rank processes (which need neither Spark nor MLflow) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["PipelineConfig", "__version__", "load_config", "run_pipeline"]

if TYPE_CHECKING:
    from lepton_spark.config import PipelineConfig, load_config
    from lepton_spark.pipeline.run import run_pipeline


def __getattr__(name: str) -> Any:
    if name == "run_pipeline":
        from lepton_spark.pipeline.run import run_pipeline

        return run_pipeline
    if name in ("PipelineConfig", "load_config"):
        from lepton_spark import config

        return getattr(config, name)
    raise AttributeError(f"module 'lepton_spark' has no attribute {name!r}")
