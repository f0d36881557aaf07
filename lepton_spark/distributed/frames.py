"""``materialize(df, ...)``: a DataFrame as committed Arrow shards, for ``context().loader``.

The pipeline's own shard step (:func:`lepton_spark.pipeline.steps.materialize_shards`) on a
DataFrame: the same feature encoding (numbers standardised or not, categories indexed, arrays,
text), the same seeded train/validation split, the same balanced, checksummed shards with a
manifest, found again by the dataset fingerprint (the DataFrame's query plan and input files,
the features, the split, the ranks) instead of written twice. Classic Spark and Spark Connect.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lepton_spark.config import PipelineConfig
from lepton_spark.data.columns import check_columns
from lepton_spark.errors import ConfigError, DataError
from lepton_spark.ml.estimator import input_view
from lepton_spark.pipeline.steps import check_folders, materialize_shards
from lepton_spark.shards.writer import ShardSet

_NUMERIC = ("tinyint", "smallint", "int", "bigint", "float", "double", "decimal")


def materialize(
    df: Any,
    *,
    label: str | None = None,
    numeric: list[str] | None = None,
    categorical: list[str] | None = None,
    arrays: list[str | dict[str, Any]] | None = None,
    text: list[str | dict[str, Any]] | None = None,
    task: str = "classification",
    num_workers: int = 2,
    validation_fraction: float = 0.1,
    seed: int = 42,
    root: str = ".lepton/shards",
    name: str = "materialized",
    rebuild: bool = False,
    **features: Any,
) -> ShardSet:
    """Write ``df`` as shards for ``num_workers`` ranks (or find them); the committed ShardSet.

    ``label`` (not for ``task="clustering"``) and the feature columns by kind; with no feature
    column named, every numeric column but the label is one. Other keywords are
    ``features.*`` settings of a pipeline file (``standardize``, ``nulls``, ``num_classes``,
    ``weight``, ...); ``root`` is ``shards.root`` (a path or an object-store URI every rank
    reaches). ``rebuild`` writes them again even when committed shards with the same
    fingerprint exist. A bad column or setting raises a ``ConfigError`` / ``DataError``
    naming it, before any Spark job.
    """
    if getattr(df, "isStreaming", False):
        raise DataError("materialize takes a batch DataFrame; this one is streaming")
    named = any((numeric, categorical, arrays, text))
    if not named:
        numeric = [
            f.name
            for f in df.schema.fields
            if f.name != label and f.dataType.simpleString().startswith(_NUMERIC)
        ]
        if not numeric:
            raise ConfigError(
                "materialize: no feature column named and no numeric column to take "
                f"(columns: {', '.join(df.columns)}); pass numeric=, categorical=, arrays= "
                "or text="
            )
    data = {
        "name": name,
        "sources": {"input": {"table": input_view(df)}},
        "features": {
            "task": task,
            "label": label,
            "numeric": numeric or [],
            "categorical": categorical or [],
            "arrays": [a if isinstance(a, dict) else {"name": a} for a in arrays or []],
            "text": [t if isinstance(t, dict) else {"name": t} for t in text or []],
            **features,
        },
        "split": {"validation_fraction": validation_fraction, "seed": seed},
        "shards": {"root": root},
        "train": {"num_workers": num_workers},
    }
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"materialize: {problems}") from None
    check_columns(df, cfg.features)
    check_folders(cfg)
    return materialize_shards(df.sparkSession, cfg, rebuild=rebuild)
