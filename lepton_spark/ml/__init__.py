"""The Spark ML front door: ``TorchEstimator`` (:mod:`.estimator`) and ``TorchModel``
(:mod:`.model`), with Params derived from the pipeline config (:mod:`.params`). Imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lepton_spark.ml.estimator import TorchEstimator
    from lepton_spark.ml.model import TorchModel

__all__ = ["TorchEstimator", "TorchModel"]


def __getattr__(name: str) -> Any:
    if name == "TorchEstimator":
        from lepton_spark.ml.estimator import TorchEstimator

        return TorchEstimator
    if name == "TorchModel":
        from lepton_spark.ml.model import TorchModel

        return TorchModel
    raise AttributeError(f"module 'lepton_spark.ml' has no attribute {name!r}")
