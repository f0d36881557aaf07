"""Bad values: null, NaN or infinite numbers, null labels, negative weights, broken arrays.

One pass (:func:`statistics`) counts them per column beside the row count, the label range and
the array lengths (and, with standardisation off, each number's spread: :func:`warn_unscaled`);
:func:`clean` applies ``features.nulls`` (fail, drop the rows, or fill numbers).
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lepton_spark.config import FeatureSpecConfig
from lepton_spark.errors import DataError

log = logging.getLogger(__name__)


def bad_value(column: str) -> Column:
    value = F.col(column).cast("double")
    return value.isNull() | F.isnan(value) | (F.abs(value) == float("inf"))


def bad_array(column: str) -> Column:
    values = F.col(column)
    return values.isNull() | F.exists(
        values, lambda x: x.isNull() | F.isnan(x.cast("double")) | (F.abs(x) == float("inf"))
    )


def bad_columns(spec: FeatureSpecConfig) -> dict[str, Column]:
    """Per column, the rows it makes unusable: null/NaN/inf numbers, null labels and weights,
    arrays that are null or hold a null/NaN/inf (text may be null: it has no tokens)."""
    bad = {c: bad_value(c) for c in spec.numeric}
    if spec.label is not None:
        bad[spec.label] = (
            bad_value(spec.label) if spec.task == "regression" else F.col(spec.label).isNull()
        )
    if spec.weight is not None:
        bad[spec.weight] = bad_value(spec.weight) | (F.col(spec.weight) < 0)
    for a in spec.arrays:
        bad[a.name] = bad_array(a.name)
    return bad


def bad_row(spec: FeatureSpecConfig) -> Column:
    bad = F.lit(False)
    for column in bad_columns(spec).values():
        bad = bad | column
    return bad


def statistics(df: DataFrame, spec: FeatureSpecConfig) -> dict[str, Any]:
    """Row count, label range, array lengths and bad values per column, in one pass (and each
    number's standard deviation when standardisation is off)."""
    aggs = [
        F.count(F.lit(1)).alias("rows"),
        F.sum(bad_row(spec).cast("long")).alias("bad_rows"),
    ]
    kept = ~bad_row(spec)  # rows that survive nulls: drop (and all rows when nothing is bad)
    if spec.task == "classification" and spec.label is not None:
        aggs += [
            F.min(F.when(kept, F.col(spec.label))).cast("long").alias("label_min"),
            F.max(F.when(kept, F.col(spec.label))).cast("long").alias("label_max"),
        ]
    for column, bad in bad_columns(spec).items():
        aggs.append(F.sum(bad.cast("long")).alias(f"bad:{column}"))
    for a in spec.arrays:
        aggs += [
            F.min(F.when(kept, F.size(a.name))).alias(f"len_min:{a.name}"),
            F.max(F.when(kept, F.size(a.name))).alias(f"len_max:{a.name}"),
        ]
    if not spec.standardize:  # said when a number's scale would dwarf the others'
        aggs += [F.stddev(F.when(kept, F.col(c))).alias(f"std:{c}") for c in spec.numeric]
    row = df.agg(*aggs).first()
    assert row is not None
    return row.asDict()


LARGE_STD = 100.0


def warn_unscaled(spec: FeatureSpecConfig, stats: dict[str, Any]) -> list[str]:
    """With standardisation off, warn naming each numeric feature whose standard deviation is
    above :data:`LARGE_STD`; those names."""
    large = {
        c: float(stats[f"std:{c}"])
        for c in spec.numeric
        if stats.get(f"std:{c}") is not None and float(stats[f"std:{c}"]) > LARGE_STD
    }
    if large:
        listed = ", ".join(f"{c!r} ({std:,.4g})" for c, std in large.items())
        log.warning(
            "numeric features with a standard deviation above %g: %s; features.standardize is "
            "off, so they enter the model in these units and can dwarf the others "
            "(features.standardize: true scales them with the training statistics)",
            LARGE_STD,
            listed,
        )
    return list(large)


def clean(
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
                    c, F.when(bad_value(c), F.lit(spec.fill_value)).otherwise(F.col(c))
                )
        log.warning("filled %s with %s", listed, spec.fill_value)
        return df, rows
    df = df.where(~bad_row(spec))
    rows -= bad_rows
    log.warning("dropped %d rows with null, NaN or infinite values (%s)", bad_rows, listed)
    if rows == 0:
        raise DataError(f"no rows left after dropping the bad values ({listed})")
    return df, rows
