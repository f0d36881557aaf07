"""The synthetic sources: schemas, sizes, determinism, and the properties each kind promises."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lepton_spark.config import GeneratedSource
from lepton_spark.data import datagen

TABULAR_COLUMNS = ["id", *[f"x{i}" for i in range(8)], "cat_a", "cat_b", "label"]


def _types(df: DataFrame) -> dict[str, str]:
    return {f.name: f.dataType.simpleString() for f in df.schema.fields}


def _rows(spark: SparkSession, **fields: Any) -> list[tuple[Any, ...]]:
    df = datagen.generate(spark, GeneratedSource(**fields))
    return [tuple(r) for r in df.orderBy("id").collect()]


def test_config_defaults_and_limits() -> None:
    source = GeneratedSource()
    assert source.kind == "tabular_classification"
    assert (source.target_noise, source.clusters, source.dims, source.cluster_std) == (
        0.5,
        8,
        10,
        1.0,
    )
    assert (source.vocabulary, source.min_words, source.max_words, source.topics) == (
        2000,
        8,
        40,
        4,
    )
    assert "noise added to the target" in (GeneratedSource.model_fields["target_noise"].description)
    for bad in (
        {"kind": "images"},
        {"target_noise": -0.1},
        {"clusters": 1},
        {"clusters": 65},
        {"dims": 0},
        {"dims": 257},
        {"cluster_std": 0.0},
        {"vocabulary": 49},
        {"topics": 1},
        {"topics": 21},
        {"min_words": 10, "max_words": 9},
    ):
        with pytest.raises(ValidationError):
            GeneratedSource(**bad)
    assert GeneratedSource(min_words=5, max_words=5).max_words == 5


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "tabular_classification", "rows": 3000},
        {"kind": "tabular_regression", "rows": 3000},
        {"kind": "digits"},
        {"kind": "topics", "rows": 3000, "label_noise": 0.2},
        {"kind": "blobs", "rows": 3000, "dims": 5},
    ],
    ids=lambda f: f["kind"],
)
def test_same_rows_whatever_the_partitioning(spark: SparkSession, fields: dict[str, Any]) -> None:
    df = datagen.generate(spark, GeneratedSource(**fields, partitions=5))
    assert df.rdd.getNumPartitions() == 5
    rows = _rows(spark, **fields, partitions=2)
    assert rows == _rows(spark, **fields, partitions=5)
    if fields["kind"] != "digits":  # the digits are sklearn's, whatever the seed
        assert rows != _rows(spark, **fields, seed=8, partitions=2)


def test_tabular_classification_is_unchanged(spark: SparkSession) -> None:
    """The demo table is the one earlier versions made (the same config, the same rows)."""
    df = datagen.generate(spark, GeneratedSource(rows=1000, partitions=3))
    assert df.columns == TABULAR_COLUMNS
    assert _types(df)["label"] == "int"
    first = df.orderBy("id").limit(2).collect()
    assert first[0]["x0"] == -0.7980667868818097
    assert first[1]["x7"] == -0.41590547529832594
    assert [(r["cat_a"], r["cat_b"], r["label"]) for r in first] == [
        ("a08", "b1", 1),
        ("a06", "b1", 0),
    ]
    assert df.agg(F.sum("label")).first()[0] == 499
    assert datagen.bayes_accuracy(GeneratedSource(label_noise=0.1)) == pytest.approx(0.9)


def test_tabular_regression_noise_is_the_best_mse(spark: SparkSession) -> None:
    source = GeneratedSource(kind="tabular_regression", rows=20_000, target_noise=0.7)
    df = datagen.generate(spark, source)
    assert df.columns == TABULAR_COLUMNS
    assert _types(df)["label"] == "double"
    assert df.count() == 20_000

    # The features are the classification table's, and the label is its score plus noise.
    classification = datagen.generate(
        spark, source.model_copy(update={"kind": "tabular_classification"})
    )
    features = TABULAR_COLUMNS[:-1]
    assert df.select(features).exceptAll(classification.select(features)).count() == 0

    stats = df.select((F.col("label") - datagen.score()).alias("r")).agg(
        F.mean("r").alias("mean"), F.var_samp("r").alias("var")
    )
    row = stats.first()
    assert abs(row["mean"]) < 0.03
    assert row["var"] == pytest.approx(0.49, rel=0.1)
    assert datagen.best_mse(source) == pytest.approx(0.49)
    assert datagen.best_mse(GeneratedSource()) is None
    assert datagen.bayes_accuracy(source) is None


def test_digits_are_sklearns(spark: SparkSession) -> None:
    from sklearn.datasets import load_digits

    df = datagen.generate(spark, GeneratedSource(kind="digits", rows=10, partitions=3))
    assert _types(df) == {"id": "bigint", "pixels": "array<double>", "label": "int"}
    rows = df.orderBy("id").collect()  # rows=10 is ignored
    assert len(rows) == 1797
    assert [r["id"] for r in rows] == list(range(1797))
    pixels = np.array([r["pixels"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    assert pixels.shape == (1797, 64)
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))
    digits = load_digits()
    np.testing.assert_array_equal(pixels * 16, digits.data)
    np.testing.assert_array_equal(labels, digits.target)
    assert datagen.bayes_accuracy(GeneratedSource(kind="digits")) is None


def test_topics_documents_are_classifiable_by_their_words(spark: SparkSession) -> None:
    source = GeneratedSource(
        kind="topics", rows=4000, label_noise=0.0, vocabulary=600, min_words=5, max_words=30
    )
    df = datagen.generate(spark, source)
    assert _types(df) == {"id": "bigint", "text": "string", "label": "int"}
    pdf = df.orderBy("id").toPandas()
    assert len(pdf) == 4000
    assert set(pdf["label"]) == set(range(source.topics))
    assert pdf["label"].value_counts().min() > 800  # topics are drawn uniformly

    words = pdf["text"].str.split(" ")
    lengths = words.map(len)
    assert lengths.min() == source.min_words and lengths.max() == source.max_words

    own, common = datagen.topic_vocabulary(source)
    vocabulary = [w for topic in own for w in topic] + common
    assert len(vocabulary) == len(set(vocabulary)) == source.vocabulary
    assert all(len(topic) == len(own[0]) for topic in own)
    topic_of = {w: t for t, topic in enumerate(own) for w in topic}
    seen = Counter(w for doc in words for w in doc)
    assert set(seen) <= set(vocabulary)

    # About 35% of the words belong to the document's topic, the rest are common words.
    share = words.map(lambda doc: sum(w in topic_of for w in doc)).sum() / lengths.sum()
    assert share == pytest.approx(datagen.TOPIC_WORD_SHARE, abs=0.02)

    def most_frequent_topic(doc: list[str]) -> int:
        counts = Counter(topic_of[w] for w in doc if w in topic_of)
        return counts.most_common(1)[0][0] if counts else 0

    predicted = words.map(most_frequent_topic)
    accuracy = float((predicted == pdf["label"]).mean())
    assert accuracy > 0.9
    # Any single word says little: most are common words, shared by every topic.
    first_word_informative = float(words.map(lambda doc: doc[0] in topic_of).mean())
    assert first_word_informative < 0.5
    assert datagen.bayes_accuracy(source) is None


def test_topics_label_noise_changes_labels_only(spark: SparkSession) -> None:
    clean_source = GeneratedSource(kind="topics", rows=4000, label_noise=0.0)
    clean = datagen.generate(spark, clean_source).orderBy("id").toPandas()
    noisy_source = clean_source.model_copy(update={"label_noise": 0.2})
    noisy = datagen.generate(spark, noisy_source).orderBy("id").toPandas()
    pd.testing.assert_series_equal(clean["text"], noisy["text"])
    changed = float((clean["label"] != noisy["label"]).mean())
    # A flipped label is a uniform topic: it stays the same one time in `topics`.
    assert changed == pytest.approx(0.2 * (1 - 1 / clean_source.topics), abs=0.03)


def test_blobs_cluster_means_are_the_centers(spark: SparkSession) -> None:
    source = GeneratedSource(kind="blobs", rows=20_000, clusters=6, dims=4, cluster_std=1.5)
    df = datagen.generate(spark, source)
    features = [f"f{d}" for d in range(source.dims)]
    assert _types(df) == {"id": "bigint", **dict.fromkeys(features, "double"), "label": "int"}
    pdf = df.toPandas()
    assert len(pdf) == 20_000
    centers = datagen.blob_centers(source)
    assert centers.shape == (6, 4)
    assert np.abs(centers).max() <= 10
    np.testing.assert_array_equal(centers, datagen.blob_centers(source))
    assert not np.array_equal(centers, datagen.blob_centers(source.model_copy(update={"seed": 8})))

    assert sorted(pdf["label"].unique()) == list(range(6))
    means = pdf.groupby("label")[features].mean().sort_index().to_numpy()
    np.testing.assert_allclose(means, centers, atol=0.1)
    stds = pdf.groupby("label")[features].std().to_numpy()
    np.testing.assert_allclose(stds, 1.5, rtol=0.1)
    assert datagen.bayes_accuracy(source) is None
