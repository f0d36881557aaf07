"""Spark side of the pipeline: session, sources, SQL transform, features and label, split.

The result is a :class:`PreparedData`: the train and validation DataFrames with numeric columns as
float, categorical columns as vocabulary indices and the label as an integer class, and the
:class:`~lepton_spark.spec.FeatureSpec` that describes them. Nothing is collected to the driver but
small statistics (row counts, vocabularies).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.utils import AnalysisException

from lepton_spark import datagen
from lepton_spark.config import (
    ArrayConfig,
    FeatureSpecConfig,
    PipelineConfig,
    SourceConfig,
    SparkConfig,
    SplitConfig,
)
from lepton_spark.errors import InputError
from lepton_spark.spec import (
    FIRST_WORD,
    PAD_TOKEN,
    TOKEN_SPLIT,
    UNKNOWN_INDEX,
    UNKNOWN_TOKEN,
    ArrayFeature,
    CategoricalFeature,
    FeatureSpec,
    Standardization,
    TextFeature,
)

log = logging.getLogger(__name__)


class DataError(InputError):
    """The input data cannot be trained on; the message names the source or column."""


@dataclass(frozen=True)
class PreparedData:
    train: DataFrame
    validation: DataFrame
    feature_spec: FeatureSpec
    rows: int
    features: DataFrame  # both splits' parent, cached while the shards are written
    quality: dict[str, int]  # bad values per column, rows dropped or filled (features.nulls)

    def release(self) -> None:
        """Drop the cached features (once the shards are written)."""
        self.features.unpersist()


# Loopback-only defaults for local masters: no traffic leaves the machine, and the addresses ranks
# use to reach each other and the driver are the ones Spark reports.
_LOCAL_DEFAULTS = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
}
_DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    # A barrier stage that cannot get all its slots fails fast instead of retrying for minutes
    # (we check slots before submitting, this is the backstop).
    "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "2",
    "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "2s",
}


def spark_session(cfg: SparkConfig, app_name: str = "lepton-spark") -> SparkSession:
    """Get or create the SparkSession for this config.

    An active session (a notebook's, spark-submit's) is reused as it is; otherwise one is built
    from ``cfg`` with executors running this interpreter.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(cfg.master).appName(cfg.app_name or app_name)
    conf = dict(_DEFAULTS)
    if cfg.master.startswith("local"):
        conf.update(_LOCAL_DEFAULTS)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    conf.update(cfg.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark


def submitted_session(cfg: SparkConfig, app_name: str = "lepton-spark") -> SparkSession:
    """The session of a spark-submit job: spark-submit's ``--master``, ``--conf`` and properties
    file win; the pipeline's ``spark.conf`` and lepton-spark's defaults fill in the rest."""
    from pyspark import SparkConf

    given = SparkConf()  # what spark-submit passed to this driver
    master = given.get("spark.master", cfg.master)
    conf = dict(_DEFAULTS)
    if master.startswith("local"):
        conf.update(_LOCAL_DEFAULTS)
    conf.update(cfg.conf)
    builder = SparkSession.builder.appName(app_name)
    for key, value in conf.items():
        if not given.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark


def read_source(spark: SparkSession, name: str, source: SourceConfig) -> DataFrame:
    if source.generate is not None:
        return datagen.generate(spark, source.generate)
    if source.table is not None:
        try:
            return spark.table(source.table)
        except AnalysisException as err:
            raise DataError(f"source {name!r}: table {source.table!r} not found: {err}") from None
    assert source.path is not None
    if "://" not in source.path and not Path(source.path).exists():
        raise DataError(f"source {name!r}: path {source.path} does not exist")
    try:
        return spark.read.format(source.format).options(**source.options).load(source.path)
    except AnalysisException as err:
        raise DataError(
            f"source {name!r}: cannot read {source.path} as {source.format}: {err}"
        ) from None


def load_and_transform(spark: SparkSession, cfg: PipelineConfig) -> DataFrame:
    """Register each source as a view under its name and apply the SQL transform."""
    frames = {name: read_source(spark, name, src) for name, src in cfg.sources.items()}
    if cfg.transform is None:
        return next(iter(frames.values()))
    for name, frame in frames.items():
        frame.createOrReplaceTempView(name)
    try:
        return spark.sql(cfg.transform)
    except AnalysisException as err:
        raise DataError(f"transform: Spark SQL failed: {err}") from None


_NUMERIC_TYPES = (T.NumericType, T.BooleanType)


def is_vector(data_type: T.DataType) -> bool:
    return data_type.typeName() == "vector" or type(data_type).__name__ == "VectorUDT"


def _check_columns(df: DataFrame, spec: FeatureSpecConfig) -> None:
    types = {f.name: f.dataType for f in df.schema.fields}
    wanted = [
        *spec.numeric,
        *spec.categorical,
        *(a.name for a in spec.arrays),
        *(t.name for t in spec.text),
        *([spec.label] if spec.label else []),
        *([spec.weight] if spec.weight else []),
    ]
    missing = [c for c in wanted if c not in types]
    if missing:
        raise DataError(
            f"columns {missing} are in the feature spec but not in the data "
            f"(columns: {sorted(types)})"
        )
    named = [(c, "numeric feature") for c in spec.numeric]
    named += [(spec.weight, "weight column")] if spec.weight else []
    for c, what in named:
        if not isinstance(types[c], _NUMERIC_TYPES):
            raise DataError(f"{what} {c!r} has Spark type {types[c].simpleString()}")
    for c in spec.categorical:
        if isinstance(types[c], (T.FractionalType, T.TimestampType, T.TimestampNTZType)):
            raise DataError(
                f"categorical feature {c!r} has Spark type {types[c].simpleString()}: its values "
                "would not print the same way when the model is served; cast it in the transform "
                f"(CAST({c} AS BIGINT) or CAST({c} AS STRING))"
            )
    for a in spec.arrays:
        t = types[a.name]
        ok = is_vector(t) or (
            isinstance(t, T.ArrayType) and isinstance(t.elementType, _NUMERIC_TYPES)
        )
        if not ok:
            raise DataError(
                f"array feature {a.name!r} has Spark type {t.simpleString()}; it needs an array "
                "of numbers or a Spark ML vector"
            )
    for text in spec.text:
        if not isinstance(types[text.name], T.StringType):
            raise DataError(
                f"text feature {text.name!r} has Spark type {types[text.name].simpleString()}"
            )
    if spec.label is None:
        return
    label_type = types[spec.label]
    if spec.task == "classification" and not isinstance(
        label_type, (T.IntegralType, T.BooleanType)
    ):
        raise DataError(
            f"label {spec.label!r} has Spark type {label_type.simpleString()}; "
            "a classification label must be an integer class index"
        )
    if spec.task == "regression" and not isinstance(label_type, _NUMERIC_TYPES):
        raise DataError(
            f"label {spec.label!r} has Spark type {label_type.simpleString()}; a regression "
            "target must be a number"
        )


def _bad_value(column: str) -> Column:
    value = F.col(column).cast("double")
    return value.isNull() | F.isnan(value) | (F.abs(value) == float("inf"))


def _bad_array(column: str) -> Column:
    values = F.col(column)
    return values.isNull() | F.exists(
        values, lambda x: x.isNull() | F.isnan(x.cast("double")) | (F.abs(x) == float("inf"))
    )


def _bad_columns(spec: FeatureSpecConfig) -> dict[str, Column]:
    """Per column, the rows it makes unusable: null/NaN/inf numbers, null labels and weights,
    arrays that are null or hold a null/NaN/inf (text may be null: it has no tokens)."""
    bad = {c: _bad_value(c) for c in spec.numeric}
    if spec.label is not None:
        bad[spec.label] = (
            _bad_value(spec.label) if spec.task == "regression" else F.col(spec.label).isNull()
        )
    if spec.weight is not None:
        bad[spec.weight] = _bad_value(spec.weight) | (F.col(spec.weight) < 0)
    for a in spec.arrays:
        bad[a.name] = _bad_array(a.name)
    return bad


def _bad_row(spec: FeatureSpecConfig) -> Column:
    bad = F.lit(False)
    for column in _bad_columns(spec).values():
        bad = bad | column
    return bad


def _statistics(df: DataFrame, spec: FeatureSpecConfig) -> dict[str, int | None]:
    """Row count, label range, array lengths and bad values per column, in one pass."""
    aggs = [
        F.count(F.lit(1)).alias("rows"),
        F.sum(_bad_row(spec).cast("long")).alias("bad_rows"),
    ]
    kept = ~_bad_row(spec)  # rows that survive nulls: drop (and all rows when nothing is bad)
    if spec.task == "classification" and spec.label is not None:
        aggs += [
            F.min(F.when(kept, F.col(spec.label))).cast("long").alias("label_min"),
            F.max(F.when(kept, F.col(spec.label))).cast("long").alias("label_max"),
        ]
    for column, bad in _bad_columns(spec).items():
        aggs.append(F.sum(bad.cast("long")).alias(f"bad:{column}"))
    for a in spec.arrays:
        aggs += [
            F.min(F.when(kept, F.size(a.name))).alias(f"len_min:{a.name}"),
            F.max(F.when(kept, F.size(a.name))).alias(f"len_max:{a.name}"),
        ]
    row = df.agg(*aggs).first()
    assert row is not None
    return row.asDict()


def _vocabulary(df: DataFrame, column: str, limit: int) -> list[str]:
    """Most frequent values first (ties by value), at most ``limit``; nulls excluded."""
    rows = (
        df.where(F.col(column).isNotNull())
        .groupBy(F.col(column).cast("string").alias("v"))
        .count()
        .orderBy(F.desc("count"), F.asc("v"))
        .limit(limit)
        .collect()
    )
    return [r["v"] for r in rows]


def _index_column(df: DataFrame, column: str, vocabulary: list[str]) -> DataFrame:
    """Replace ``column`` by its vocabulary index (1-based; unknown and null are 0)."""
    spark = df.sparkSession
    lookup = spark.createDataFrame(
        [(v, i + 1) for i, v in enumerate(vocabulary)],
        T.StructType([T.StructField("_v", T.StringType()), T.StructField("_i", T.IntegerType())]),
    )
    joined = df.join(F.broadcast(lookup), F.col(column).cast("string") == F.col("_v"), "left")
    return joined.withColumn(column, F.coalesce(F.col("_i"), F.lit(UNKNOWN_INDEX))).drop("_v", "_i")


def build_features(
    df: DataFrame,
    spec: FeatureSpecConfig,
    keep: tuple[str, ...] = (),
    quality: dict[str, int] | None = None,
) -> tuple[DataFrame, FeatureSpec, int]:
    """Validate the columns, clean, standardise, index categoricals, tokenise text, and select
    ``numeric…, categorical…, arrays…, texts…, label, weight``.

    ``keep``: more columns carried along as they are (a shard key that is not a feature).
    ``quality``: when given, receives the bad values per column and the rows dropped or filled
    under ``spec.nulls``.
    """
    _check_columns(df, spec)
    absent = [c for c in keep if c not in df.columns]
    if absent:
        raise DataError(
            f"shards.key {absent[0]!r} is not a column of the data (columns: {sorted(df.columns)})"
        )
    types = {f.name: f.dataType for f in df.schema.fields}
    for a in spec.arrays:  # Spark ML vectors become plain arrays
        if is_vector(types[a.name]):
            from pyspark.ml.functions import vector_to_array

            df = df.withColumn(a.name, vector_to_array(F.col(a.name)))
    stats = _statistics(df, spec)
    rows = int(stats["rows"] or 0)
    if rows == 0:
        raise DataError("the dataset is empty after the transform")
    bad = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("bad:") and v}
    bad_rows = int(stats["bad_rows"] or 0)
    if quality is not None:
        quality.update({f"bad_values.{c}": n for c, n in bad.items()})
        quality["rows_dropped"] = bad_rows if bad and spec.nulls == "drop" else 0
        quality["rows_filled"] = bad_rows if bad and spec.nulls == "fill" else 0
    if bad:
        df, rows = _clean(df, spec, bad, bad_rows, rows)
    num_classes = None
    if spec.task == "classification":
        label_min, label_max = int(stats["label_min"] or 0), int(stats["label_max"] or 0)
        num_classes = spec.num_classes or max(label_max + 1, 2)
        if label_min < 0 or label_max >= num_classes:
            raise DataError(
                f"label {spec.label!r} has values in [{label_min}, {label_max}], "
                f"outside [0, {num_classes}) for num_classes={num_classes}"
            )
    arrays = [_array_feature(a, stats) for a in spec.arrays]
    standardize = _standardization(df, spec.numeric) if spec.standardize else {}
    categorical = []
    for c in spec.categorical:
        vocabulary = _vocabulary(df, c, spec.max_categories)
        categorical.append(CategoricalFeature(name=c, vocabulary=vocabulary))
        df = _index_column(df, c, vocabulary)
    texts = []
    for t in spec.text:
        feature = TextFeature(
            name=t.name,
            vocabulary=_words(df, t.name, t.max_vocabulary, t.min_count),
            max_length=t.max_length,
        )
        texts.append(feature)
        df = df.withColumn(t.name, _token_ids(F.col(t.name), feature))
    used = {*spec.numeric, *spec.categorical, *(a.name for a in arrays), *(t.name for t in texts)}
    label: list[Column] = []
    if spec.label is not None:
        label_type = "double" if spec.task == "regression" else "long"
        label = [F.col(spec.label).cast(label_type).alias(spec.label)]
        used.add(spec.label)
    weight = [F.col(spec.weight).cast("float").alias(spec.weight)] if spec.weight else []
    used.update([spec.weight] if spec.weight else [])
    out = df.select(
        *[_numeric(c, standardize.get(c)) for c in spec.numeric],
        *[F.col(c).cast("long").alias(c) for c in spec.categorical],
        *[F.col(a.name).cast("array<float>").alias(a.name) for a in arrays],
        *[F.col(t.name) for t in texts],
        *label,
        *weight,
        *[F.col(c) for c in keep if c not in used],
    )
    feature_spec = FeatureSpec(
        numeric=list(spec.numeric),
        categorical=categorical,
        label=spec.label,
        num_classes=num_classes,
        task=spec.task,
        arrays=arrays,
        texts=texts,
        weight=spec.weight,
        standardize=standardize,
        fill_value=spec.fill_value,
    )
    return out, feature_spec, rows


def _clean(
    df: DataFrame, spec: FeatureSpecConfig, bad: dict[str, int], bad_rows: int, rows: int
) -> tuple[DataFrame, int]:
    """Apply ``features.nulls`` to the bad values found: fail, drop the rows, or fill numbers."""
    listed = ", ".join(f"{c!r}: {n} rows" for c, n in bad.items())
    if spec.weight in bad:
        listed += " (a negative weight counts too)"
    if spec.nulls == "fail":
        raise DataError(
            f"null, NaN or infinite values in {listed} "
            "(features.nulls: drop or fill to train anyway)"
        )
    if spec.nulls == "fill":
        unfillable = [c for c in bad if c not in spec.numeric]
        if spec.label in unfillable:
            raise DataError(
                f"label {spec.label!r} is null in {bad[spec.label]} rows; a label cannot be "
                "filled (features.nulls: drop removes those rows)"
            )
        if unfillable:
            raise DataError(
                f"{unfillable} have null, NaN, infinite (or negative weight) values in "
                f"{[bad[c] for c in unfillable]} rows; only numeric features are filled "
                "(features.nulls: drop removes those rows)"
            )
        for c in spec.numeric:
            if bad.get(c):
                df = df.withColumn(
                    c, F.when(_bad_value(c), F.lit(spec.fill_value)).otherwise(F.col(c))
                )
        log.warning("filled %s with %s", listed, spec.fill_value)
        return df, rows
    df = df.where(~_bad_row(spec))
    rows -= bad_rows
    log.warning("dropped %d rows with null, NaN or infinite values (%s)", bad_rows, listed)
    if rows == 0:
        raise DataError(f"no rows left after dropping the bad values ({listed})")
    return df, rows


def _array_feature(cfg: ArrayConfig, stats: dict[str, int | None]) -> ArrayFeature:
    """The array's per-row shape: every row must have the same number of values."""
    low, high = stats[f"len_min:{cfg.name}"], stats[f"len_max:{cfg.name}"]
    if low is None or high is None or low != high:
        raise DataError(
            f"array feature {cfg.name!r} has rows of {low}..{high} values; every row needs the "
            "same length (pad or cut it in the transform)"
        )
    shape = list(cfg.shape) if cfg.shape else [int(low)]
    if prod(shape) != low:
        raise DataError(
            f"array feature {cfg.name!r}: shape {shape} holds {prod(shape)} values, rows have {low}"
        )
    return ArrayFeature(name=cfg.name, shape=shape)


def _tokens(text: Column) -> Column:
    """Lower case, split on anything but letters and digits (as :mod:`lepton_spark.serving`)."""
    return F.filter(F.split(F.lower(F.coalesce(text, F.lit(""))), TOKEN_SPLIT), lambda t: t != "")


def _words(df: DataFrame, column: str, limit: int, min_count: int) -> list[str]:
    """The text column's most frequent words (ties by word), seen at least ``min_count`` times."""
    rows = (
        df.select(F.explode(_tokens(F.col(column))).alias("w"))
        .groupBy("w")
        .count()
        .where(F.col("count") >= min_count)
        .orderBy(F.desc("count"), F.asc("w"))
        .limit(limit)
        .collect()
    )
    return [r["w"] for r in rows]


def _token_ids(text: Column, feature: TextFeature) -> Column:
    """Token ids, padded with 0 or cut to ``max_length``; unknown words are 1."""
    ids = {w: i + FIRST_WORD for i, w in enumerate(feature.vocabulary)}
    lookup = F.create_map(*[F.lit(x) for pair in ids.items() for x in pair]) if ids else None
    tokens = F.slice(_tokens(text), 1, feature.max_length)
    if lookup is None:
        mapped = F.transform(tokens, lambda _: F.lit(UNKNOWN_TOKEN).cast("long"))
    else:
        mapped = F.transform(
            tokens,
            lambda t: F.coalesce(F.try_element_at(lookup, t), F.lit(UNKNOWN_TOKEN)).cast("long"),
        )
    padding = F.array_repeat(F.lit(PAD_TOKEN).cast("long"), feature.max_length - F.size(mapped))
    return F.concat(mapped, padding)


def _standardization(df: DataFrame, columns: list[str]) -> dict[str, Standardization]:
    """Mean and population std per column, one pass over the cleaned rows (std 0 → 1)."""
    if not columns:
        return {}
    aggs = []
    for c in columns:
        value = F.col(c).cast("double")
        aggs += [F.avg(value).alias(f"m:{c}"), F.stddev_pop(value).alias(f"s:{c}")]
    row = df.agg(*aggs).first()
    assert row is not None
    stats = {}
    for c in columns:
        std = float(row[f"s:{c}"] or 0.0)
        stats[c] = Standardization(mean=float(row[f"m:{c}"] or 0.0), std=std if std > 0 else 1.0)
    return stats


def _numeric(column: str, scale: Standardization | None) -> Column:
    value = F.col(column).cast("double")
    if scale is not None:
        value = (value - F.lit(scale.mean)) / F.lit(scale.std)
    return value.cast("float").alias(column)


def split(df: DataFrame, cfg: SplitConfig) -> tuple[DataFrame, DataFrame]:
    """Seeded train/validation split."""
    train, validation = df.randomSplit(
        [1.0 - cfg.validation_fraction, cfg.validation_fraction], seed=cfg.seed
    )
    return train, validation


def prepare(spark: SparkSession, cfg: PipelineConfig) -> PreparedData:
    """Sources → transform → features and label → train/validation split."""
    df = load_and_transform(spark, cfg)
    keep = (cfg.shards.key,) if cfg.shards.key else ()
    quality: dict[str, int] = {}
    features, spec, rows = build_features(df, cfg.features, keep, quality)
    # Both splits and the shard writer read these rows more than once: compute them once.
    features = features.persist(StorageLevel.MEMORY_AND_DISK)
    train, validation = split(features, cfg.split)
    log.info("prepared %d rows: %s", rows, spec.input_columns)
    return PreparedData(
        train=train,
        validation=validation,
        feature_spec=spec,
        rows=rows,
        features=features,
        quality=quality,
    )
