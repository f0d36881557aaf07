"""MLlib baselines on small seeded problems whose answers are known: accuracy near the Bayes
rate, log loss equal to one computed in numpy, R² and MSE at the noise level, k-means centers
and cost at the true blobs'; and bad input refused with a ValueError that names the problem."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pyspark.ml import Pipeline
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import OneHotEncoder, VectorAssembler
from pyspark.sql import types as T

from lepton_spark.baselines import (
    BaselineResult,
    kmeans,
    linear_regression,
    logistic_regression,
)

TRAIN_ROWS = 2000
VAL_ROWS = 1000
CARDINALITY = 4  # index 0 = unknown


def _frames(spark, columns: dict[str, np.ndarray]):
    """The first TRAIN_ROWS rows as the training frame, the rest as validation."""
    data = pd.DataFrame(columns)
    return spark.createDataFrame(data[:TRAIN_ROWS]), spark.createDataFrame(data[TRAIN_ROWS:])


def _cached(spark) -> int:
    """How many RDDs Spark holds cached: a baseline leaves none behind."""
    return spark.sparkContext._jsc.sc().getPersistentRDDs().size()


def _features(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = TRAIN_ROWS + VAL_ROWS
    x = rng.normal(size=(n, 2)).astype(np.float32)
    cat = rng.integers(0, CARDINALITY, n).astype(np.int64)
    return x, cat


def test_logistic_regression_reaches_the_bayes_rate_and_its_log_loss_is_numpys(spark):
    rng = np.random.default_rng(1)
    x, cat = _features(rng)
    weight = np.array([0.0, -3.0, 0.0, 3.0])  # categories 1 and 3 push hard either way
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 1] + weight[cat]
    y = (rng.random(len(x)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    train, validation = _frames(spark, {"x0": x[:, 0], "x1": x[:, 1], "cat": cat, "y": y})
    bayes = float(np.mean((logit[TRAIN_ROWS:] > 0) == y[TRAIN_ROWS:]))  # 0.86 on this draw

    result = logistic_regression(
        train,
        validation,
        numeric=["x0", "x1"],
        categorical={"cat": CARDINALITY},
        label="y",
        num_classes=2,
    )

    assert isinstance(result, BaselineResult)
    assert result.name == "mllib_logistic_regression"
    assert set(result.metrics) == {"val/accuracy", "val/loss"}
    assert result.metrics["val/accuracy"] > 0.8  # chance is about 0.5
    assert result.metrics["val/accuracy"] > bayes - 0.03  # without "cat" the best is about 0.74
    assert result.metrics["val/loss"] < 0.4 < math.log(2)
    assert result.details["family"] == "binomial"
    assert result.details["train_accuracy"] > 0.8
    assert result.details["num_features"] == 2 + CARDINALITY + 1  # one-hot, and a slot for invalid
    assert result.details["iterations"] > 0
    assert (result.details["train_rows"], result.details["val_rows"]) == (TRAIN_ROWS, VAL_ROWS)
    assert 0 < result.train_seconds <= result.total_seconds

    # The same model fit by hand in plain MLlib: its probabilities give the same log loss in numpy.
    pipeline = Pipeline(
        stages=[
            OneHotEncoder(
                inputCol="cat", outputCol="cat_1hot", dropLast=False, handleInvalid="keep"
            ),
            VectorAssembler(inputCols=["x0", "x1", "cat_1hot"], outputCol="features"),
            LogisticRegression(labelCol="y", family="binomial", maxIter=100, regParam=0.0),
        ]
    )
    scored = pipeline.fit(train).transform(validation).select("y", "probability").toPandas()
    p = np.stack(scored["probability"].map(lambda v: v.toArray()).to_numpy())
    p_true = np.clip(p[np.arange(len(p)), scored["y"].to_numpy()], 1e-15, None)
    assert result.metrics["val/loss"] == pytest.approx(float(-np.log(p_true).mean()), abs=1e-4)
    accuracy = float(np.mean(p.argmax(axis=1) == scored["y"].to_numpy()))
    assert result.metrics["val/accuracy"] == pytest.approx(accuracy, abs=0.002)


def test_logistic_regression_with_three_classes_is_multinomial(spark):
    rng = np.random.default_rng(2)
    n = TRAIN_ROWS + VAL_ROWS
    y = rng.integers(0, 3, n).astype(np.int64)
    means = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    x = (means[y] + rng.normal(scale=0.8, size=(n, 2))).astype(np.float32)
    cat = np.where(rng.random(n) < 0.7, y + 1, rng.integers(0, CARDINALITY, n)).astype(np.int64)
    train, validation = _frames(spark, {"x0": x[:, 0], "x1": x[:, 1], "cat": cat, "y": y})

    result = logistic_regression(
        train,
        validation,
        numeric=["x0", "x1"],
        categorical={"cat": CARDINALITY},
        label="y",
        num_classes=3,
        reg_param=0.001,
    )

    assert result.details["family"] == "multinomial"
    assert result.details["num_classes"] == 3
    assert result.details["regParam"] == 0.001
    assert result.metrics["val/accuracy"] > 0.85  # chance is 1/3
    assert result.metrics["val/loss"] < 0.45 < math.log(3)


def test_linear_regression_recovers_the_signal_down_to_the_noise(spark):
    rng = np.random.default_rng(3)
    x, cat = _features(rng)
    weight = np.array([0.0, 1.5, -2.0, 0.5])
    noise = 0.1
    target = 2.0 * x[:, 0] - 3.0 * x[:, 1] + weight[cat] + rng.normal(scale=noise, size=len(x))
    train, validation = _frames(spark, {"x0": x[:, 0], "x1": x[:, 1], "cat": cat, "y": target})

    cached = _cached(spark)
    result = linear_regression(
        train, validation, numeric=["x0", "x1"], categorical={"cat": CARDINALITY}, label="y"
    )
    assert _cached(spark) == cached

    assert result.name == "mllib_linear_regression"
    assert set(result.metrics) == {"val/mse", "val/mae", "val/r2"}
    assert result.metrics["val/r2"] > 0.95
    assert result.metrics["val/mse"] == pytest.approx(noise**2, rel=0.2)
    assert result.metrics["val/mae"] == pytest.approx(noise * math.sqrt(2 / math.pi), rel=0.15)
    assert result.details["train_r2"] > 0.95
    assert 0 < result.train_seconds <= result.total_seconds


def test_kmeans_finds_three_blobs_and_their_cost(spark):
    rng = np.random.default_rng(4)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    which = np.repeat(np.arange(3), 300)
    points = (centers[which] + rng.normal(scale=0.5, size=(len(which), 2))).astype(np.float32)
    train = spark.createDataFrame(pd.DataFrame({"a": points[:, 0], "b": points[:, 1]}))
    true_cost = float(((points.astype(np.float64) - centers[which]) ** 2).sum())

    cached = _cached(spark)
    result = kmeans(train, features=["a", "b"], k=3, seed=7)
    assert _cached(spark) == cached

    assert result.name == "mllib_kmeans"
    assert result.metrics["train/cost"] == pytest.approx(true_cost, rel=0.05)
    found = np.array(result.details["centers"])
    assert found.shape == (3, 2)
    distance = np.linalg.norm(found[:, None, :] - centers[None, :, :], axis=2)
    assert sorted(distance.argmin(axis=1).tolist()) == [0, 1, 2]  # one center for each blob
    assert distance.min(axis=1).max() < 0.2
    assert sorted(result.details["cluster_sizes"]) == [300, 300, 300]
    assert result.details["iterations"] >= 1
    assert result.details["k"] == 3 and result.details["seed"] == 7


SCHEMA = T.StructType(
    [
        T.StructField("x0", T.FloatType()),
        T.StructField("cat", T.LongType()),
        T.StructField("y", T.LongType()),
    ]
)


def test_bad_input_raises_value_error_naming_the_problem(spark):
    empty = spark.createDataFrame([], SCHEMA)
    rows = spark.createDataFrame([(0.5, 1, 0), (-0.5, 2, 1), (1.5, 3, 1)], SCHEMA)
    common = {"numeric": ["x0"], "categorical": {"cat": CARDINALITY}, "label": "y"}
    cached = _cached(spark)

    with pytest.raises(ValueError, match="training frame has no rows"):
        logistic_regression(empty, rows, num_classes=2, **common)
    with pytest.raises(ValueError, match="training frame has no rows"):
        linear_regression(empty, rows, **common)
    with pytest.raises(ValueError, match="training frame has no rows"):
        kmeans(empty, features=["x0"], k=2)
    with pytest.raises(ValueError, match="validation frame has no rows"):
        linear_regression(rows, empty, **common)
    with pytest.raises(ValueError, match=r"validation frame has no column\(s\) \['cat'\]"):
        logistic_regression(rows, rows.drop("cat"), num_classes=2, **common)
    with pytest.raises(ValueError, match="label 'y' has Spark type float"):
        logistic_regression(rows.withColumn("y", rows.x0), rows, num_classes=2, **common)
    with pytest.raises(ValueError, match=r"training frame has no column\(s\) \['x1'\]"):
        logistic_regression(rows, rows, num_classes=2, **{**common, "numeric": ["x0", "x1"]})
    with pytest.raises(ValueError, match=r"not class indices 0\.\.1"):
        logistic_regression(rows.withColumn("y", rows.y + 1), rows, num_classes=2, **common)
    with pytest.raises(ValueError, match="column 'x0' has 1 null, NaN or infinite values"):
        kmeans(rows.union(spark.createDataFrame([(None, 1, 0)], SCHEMA)), features=["x0"], k=2)
    assert _cached(spark) == cached  # a refused frame is not left cached
