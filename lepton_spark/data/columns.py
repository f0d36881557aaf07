"""Are the feature columns there, and of types they can be trained on? (No Spark job.)"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import types as T

from lepton_spark.config import FeatureSpecConfig
from lepton_spark.errors import DataError

_NUMERIC_TYPES = (T.NumericType, T.BooleanType)


def is_vector(data_type: T.DataType) -> bool:
    return data_type.typeName() == "vector" or type(data_type).__name__ == "VectorUDT"


def check_columns(df: DataFrame, spec: FeatureSpecConfig) -> None:
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
