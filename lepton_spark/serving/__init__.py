"""The served model and what scores with it: raw columns in, predictions out.

:mod:`.preprocess` (raw columns → model inputs, as ETL did), :mod:`.scorer` (a network and its
preprocessing), :mod:`.pyfunc` (the MLflow pyfunc model, ``log_model``), :mod:`.batch`
(``score``: a table on Spark, Arrow batches, Parquet out), :mod:`.compression` (int8, pruning).

``lepton_spark.serving.TabularModel`` is the import path models logged before 0.2 carry in their
pickle; it and the public names below resolve lazily (importing the package imports nothing).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TabularModel": "lepton_spark.serving.pyfunc",
    "log_model": "lepton_spark.serving.pyfunc",
    "Scorer": "lepton_spark.serving.scorer",
    "load_scorer": "lepton_spark.serving.scorer",
    "score": "lepton_spark.serving.batch",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lepton_spark.serving' has no attribute {name!r}")
