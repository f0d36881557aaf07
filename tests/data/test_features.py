"""Feature encoding on Spark: a categorical column with more values than features.max_categories
keeps the most frequent, and says how many values and rows become "unknown"."""

from __future__ import annotations

import logging

from lepton_spark.config import FeatureSpecConfig
from lepton_spark.data.features import build_features
from lepton_spark.spec import UNKNOWN_INDEX


def test_categories_beyond_the_limit_are_counted_and_said(spark, caplog):
    values = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2 + ["e"]
    df = spark.createDataFrame(
        [(float(i), v, i % 2) for i, v in enumerate(values)], "x double, c string, y long"
    )
    spec = FeatureSpecConfig(numeric=["x"], categorical=["c"], label="y", max_categories=2)
    quality: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="lepton_spark.data.features"):
        features, feature_spec, rows = build_features(df, spec, quality=quality)
    assert feature_spec.categorical[0].vocabulary == ["a", "b"]
    assert quality["unknown_rows.c"] == 3 + 2 + 1
    assert "has 5 values, more than features.max_categories=2" in caplog.text
    assert "the 3 least frequent (6 rows) become 'unknown'" in caplog.text
    unknown = features.where(features["c"] == UNKNOWN_INDEX).count()
    assert unknown == 6 and rows == len(values)
