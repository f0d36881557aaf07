"""Features and label on Spark: check, clean, standardise, index categoricals, tokenise text.

:func:`build_features` turns the transform's output into the columns the shards hold (numeric as
float, categorical as vocabulary indices, arrays as ``array<float>``, text as token ids, the label
as an integer class or a double) and the :class:`~lepton_spark.spec.FeatureSpec` that describes
them. Nothing is collected to the driver but small statistics (counts, vocabularies).
"""

from __future__ import annotations

import logging
from math import prod
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lepton_spark.config import ArrayConfig, FeatureSpecConfig
from lepton_spark.data.columns import check_columns, is_vector
from lepton_spark.data.quality import clean, statistics, warn_unscaled
from lepton_spark.data.text import hf_token_ids, token_ids, words
from lepton_spark.errors import DataError
from lepton_spark.spec import (
    UNKNOWN_INDEX,
    ArrayFeature,
    CategoricalFeature,
    FeatureSpec,
    Standardization,
    TextFeature,
    default_invalid_policy,
)

log = logging.getLogger(__name__)


def _vocabulary(
    df: DataFrame, column: str, limit: int, quality: dict[str, int] | None = None
) -> list[str]:
    """Most frequent values first (ties by value), at most ``limit``; nulls excluded.

    With more values than ``limit`` (``features.max_categories``), the rest become "unknown":
    said with how many values and rows, and counted in ``quality`` (``unknown_rows.<column>``,
    logged as ``data/unknown_rows.<column>``)."""
    counts = (
        df.where(F.col(column).isNotNull())
        .groupBy(F.col(column).cast("string").alias("v"))
        .count()
        .orderBy(F.desc("count"), F.asc("v"))
    )
    rows = counts.limit(limit + 1).collect()
    if len(rows) > limit:
        totals = counts.agg(F.count(F.lit(1)).alias("values"), F.sum("count").alias("rows"))
        [total] = totals.collect()
        kept_rows = sum(int(r["count"]) for r in rows[:limit])
        unknown_values = int(total["values"]) - limit
        unknown_rows = int(total["rows"]) - kept_rows
        log.warning(
            "categorical %r has %d values, more than features.max_categories=%d: the %d least "
            "frequent (%d rows) become 'unknown'",
            column,
            int(total["values"]),
            limit,
            unknown_values,
            unknown_rows,
        )
        if quality is not None:
            quality[f"unknown_rows.{column}"] = unknown_rows
    return [r["v"] for r in rows[:limit]]


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
    ``quality``: when given, receives the bad values per column, the rows dropped or filled
    under ``spec.nulls``, and the rows whose category fell beyond ``features.max_categories``.
    """
    df = _checked(df, spec, keep)
    stats = statistics(df, spec)
    warn_unscaled(spec, stats)
    df, rows = _cleaned(df, spec, stats, quality)
    num_classes = _num_classes(spec, stats)
    arrays = [_array_feature(a, stats) for a in spec.arrays]
    standardize = _standardization(df, spec.numeric) if spec.standardize else {}
    df, categorical = _indexed(df, spec, quality)
    df, texts = _tokenised(df, spec)
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
        nulls=spec.nulls,
        handle_invalid=default_invalid_policy(spec.nulls),
    )
    return _selected(df, spec, feature_spec, keep), feature_spec, rows


def _checked(df: DataFrame, spec: FeatureSpecConfig, keep: tuple[str, ...]) -> DataFrame:
    """The columns are there and of trainable types; Spark ML vectors become plain arrays."""
    check_columns(df, spec)
    absent = [c for c in keep if c not in df.columns]
    if absent:
        raise DataError(
            f"shards.key {absent[0]!r} is not a column of the data (columns: {sorted(df.columns)})"
        )
    types = {f.name: f.dataType for f in df.schema.fields}
    for a in spec.arrays:
        if is_vector(types[a.name]):
            from pyspark.ml.functions import vector_to_array

            df = df.withColumn(a.name, vector_to_array(F.col(a.name)))
    return df


def _cleaned(
    df: DataFrame,
    spec: FeatureSpecConfig,
    stats: dict[str, Any],
    quality: dict[str, int] | None,
) -> tuple[DataFrame, int]:
    """``features.nulls`` applied to the bad values the statistics found; the rows left."""
    rows = int(stats["rows"] or 0)
    if rows == 0:
        raise DataError("the dataset is empty after the transform")
    bad = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("bad:") and v}
    bad_rows = int(stats["bad_rows"] or 0)
    if quality is not None:
        quality.update({f"bad_values.{c}": n for c, n in bad.items()})
        quality["rows_dropped"] = bad_rows if bad and spec.nulls == "drop" else 0
        quality["rows_filled"] = bad_rows if bad and spec.nulls == "fill" else 0
    return clean(df, spec, bad, bad_rows, rows) if bad else (df, rows)


def _num_classes(spec: FeatureSpecConfig, stats: dict[str, Any]) -> int | None:
    """Classification: ``num_classes`` (or the largest label + 1); every label inside it."""
    if spec.task != "classification":
        return None
    label_min, label_max = int(stats["label_min"] or 0), int(stats["label_max"] or 0)
    num_classes = spec.num_classes or max(label_max + 1, 2)
    if label_min < 0 or label_max >= num_classes:
        raise DataError(
            f"label {spec.label!r} has values in [{label_min}, {label_max}], "
            f"outside [0, {num_classes}) for num_classes={num_classes}"
        )
    return num_classes


def _indexed(
    df: DataFrame, spec: FeatureSpecConfig, quality: dict[str, int] | None = None
) -> tuple[DataFrame, list[CategoricalFeature]]:
    """Each categorical column's vocabulary (most frequent first) and its values as indices."""
    categorical = []
    for c in spec.categorical:
        vocabulary = _vocabulary(df, c, spec.max_categories, quality)
        categorical.append(CategoricalFeature(name=c, vocabulary=vocabulary))
        df = _index_column(df, c, vocabulary)
    return df, categorical


def _tokenised(df: DataFrame, spec: FeatureSpecConfig) -> tuple[DataFrame, list[TextFeature]]:
    """Each text column's vocabulary, and its values as padded token ids."""
    texts = []
    for t in spec.text:
        if t.tokenizer:  # a Hugging Face tokenizer: its ids, no vocabulary of ours
            from lepton_spark import hf

            size, pad = hf.tokenizer_facts(t.tokenizer)
            feature = TextFeature(
                name=t.name,
                vocabulary=[],
                max_length=t.max_length,
                tokenizer=t.tokenizer,
                vocab_size=size,
                pad_id=pad,
            )
            texts.append(feature)
            df = df.withColumn(t.name, hf_token_ids(F.col(t.name), feature))
            continue
        feature = TextFeature(
            name=t.name,
            vocabulary=words(df, t.name, t.max_vocabulary, t.min_count),
            max_length=t.max_length,
        )
        texts.append(feature)
        df = df.withColumn(t.name, token_ids(F.col(t.name), feature))
    return df, texts


def _selected(
    df: DataFrame, spec: FeatureSpecConfig, features: FeatureSpec, keep: tuple[str, ...]
) -> DataFrame:
    """The shards' columns, in order and with their types, and the ``keep`` columns."""
    used = {*features.input_columns}
    label: list[Column] = []
    if spec.label is not None:
        label_type = "double" if spec.task == "regression" else "long"
        label = [F.col(spec.label).cast(label_type).alias(spec.label)]
        used.add(spec.label)
    weight = [F.col(spec.weight).cast("float").alias(spec.weight)] if spec.weight else []
    used.update([spec.weight] if spec.weight else [])
    return df.select(
        *[_numeric(c, features.standardize.get(c)) for c in spec.numeric],
        *[F.col(c).cast("long").alias(c) for c in spec.categorical],
        *[F.col(a.name).cast("array<float>").alias(a.name) for a in features.arrays],
        *[F.col(t.name) for t in features.texts],
        *label,
        *weight,
        *[F.col(c) for c in keep if c not in used],
    )


def _array_feature(cfg: ArrayConfig, stats: dict[str, Any]) -> ArrayFeature:
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
