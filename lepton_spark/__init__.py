"""lepton-spark: train PyTorch models on data that lives in Spark.

The front door: ``run_pipeline`` and ``load_config`` (a pipeline file), ``TorchEstimator`` and
``TorchModel`` (a DataFrame, Spark ML style). They are imported lazily so that the per-rank
processes (which need neither Spark nor MLflow) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = [
    "PipelineConfig",
    "TorchEstimator",
    "TorchModel",
    "__version__",
    "load_config",
    "run_pipeline",
]

if TYPE_CHECKING:
    from lepton_spark.config import PipelineConfig, load_config
    from lepton_spark.ml.estimator import TorchEstimator
    from lepton_spark.ml.model import TorchModel
    from lepton_spark.pipeline.run import run_pipeline


def __getattr__(name: str) -> Any:
    if name == "run_pipeline":
        from lepton_spark.pipeline.run import run_pipeline

        return run_pipeline
    if name in ("TorchEstimator", "TorchModel"):
        from lepton_spark import ml

        return getattr(ml, name)
    if name in ("PipelineConfig", "load_config"):
        from lepton_spark import config

        return getattr(config, name)
    raise AttributeError(f"module 'lepton_spark' has no attribute {name!r}")
