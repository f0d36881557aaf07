"""The pipeline's sources as Spark views, and its SQL transform over them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pyspark.errors import AnalysisException, PySparkException
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lepton_spark.config import PipelineConfig, SourceConfig
from lepton_spark.data import datagen
from lepton_spark.data.columns import is_vector
from lepton_spark.errors import DataError
from lepton_spark.sparkinfo import Session, is_connect


def read_source(spark: Session, name: str, source: SourceConfig) -> DataFrame:
    if source.generate is not None:
        return datagen.generate(spark, source.generate)
    if source.table is not None:
        try:
            return _analysed(spark.table(source.table))
        except AnalysisException as err:
            raise DataError(f"source {name!r}: table {source.table!r} not found: {err}") from None
    assert source.path is not None
    if "://" not in source.path and not is_connect(spark) and not Path(source.path).exists():
        raise DataError(f"source {name!r}: path {source.path} does not exist")
    try:
        reader = spark.read.format(source.format).options(**source.options)
        return _analysed(reader.load(source.path))
    except AnalysisException as err:
        raise DataError(
            f"source {name!r}: cannot read {source.path} as {source.format}: {err}"
        ) from None


def _analysed(df: DataFrame) -> DataFrame:
    """``df`` once Spark has resolved it: a Connect client learns of a missing table, path or
    column only when it asks (classic Spark says at once), so ask here."""
    _ = df.schema
    return df


def load_and_transform(spark: Session, cfg: PipelineConfig) -> DataFrame:
    """Register each source as a view under its name and apply the SQL transform."""
    frames = {name: read_source(spark, name, src) for name, src in cfg.sources.items()}
    if cfg.transform is None:
        return next(iter(frames.values()))
    for name, frame in frames.items():
        frame.createOrReplaceTempView(name)
    try:
        return _analysed(spark.sql(cfg.transform))
    except AnalysisException as err:
        raise DataError(f"transform: Spark SQL failed: {err}") from None


def empty_source(spark: Session, cfg: PipelineConfig, df: DataFrame) -> DataError | None:
    """The error for the first source with no rows, if one has none: a CSV or JSON file with a
    header and no rows reads as every column a string, so the type check names a column when the
    fault is the source. One small Spark job per source (``isEmpty``): asked only once the data
    has failed a check, never on the way to a run. ``df`` is what :func:`load_and_transform`
    returned (its sources are its views when there is a transform)."""
    for name, source in cfg.sources.items():
        if source.generate is not None:
            continue
        try:
            frame = df if cfg.transform is None else spark.table(name)
            empty = frame.isEmpty()
        except PySparkException:  # cannot tell: the error already found stands
            continue
        if empty:
            what = f"table {source.table!r}" if source.table is not None else f"path {source.path}"
            return DataError(f"source {name!r}: {what} has no rows")
    return None


def raw_example(spark: Session, cfg: PipelineConfig, rows: int = 5) -> pd.DataFrame:
    """A few rows of the transform's output, the model's input columns as the user has them
    (the served model's input example)."""
    f = cfg.features
    columns = [*f.numeric, *f.categorical, *(a.name for a in f.arrays), *(t.name for t in f.text)]
    df = load_and_transform(spark, cfg).select(*columns).limit(rows)
    for a in f.arrays:  # Spark ML vectors as plain lists, as a pandas user would pass them
        if is_vector(df.schema[a.name].dataType):
            from pyspark.ml.functions import vector_to_array

            df = df.withColumn(a.name, vector_to_array(F.col(a.name)))
    frame = df.toPandas()
    frame.attrs = {}  # a Connect client's plan metrics: not part of the example
    return frame
