"""Spark MLlib baselines on the same train/validation split as the neural model.

What MLlib alone achieves, logged side by side with the trained model: a logistic regression
(classification), a linear regression (regression) and k-means (an unsupervised look at the
features). The features are the numeric columns as they are and each categorical vocabulary
index one-hot encoded (its cardinality from the caller, not scanned from the data), assembled into
one vector by a :class:`~pyspark.ml.Pipeline`. Metrics are named like the neural model's
(``val/accuracy``, ``val/loss``, ``val/mse``... from :mod:`lepton_spark.names`), computed in one
aggregation over the validation predictions; only those aggregates and the model's small
summaries reach the driver.

The assembled training frame is cached while the model is fit (the same pass checks it: rows,
bad values, label range) and released before the function returns; the validation frame likewise
while it is checked and scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pyspark.ml import Pipeline, PipelineModel, Transformer
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.clustering import KMeans
from pyspark.ml.feature import OneHotEncoder, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.regression import LinearRegression
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lepton_spark.config import PipelineConfig
from lepton_spark.errors import BaselineError
from lepton_spark.names import TRAIN_COST, VAL_ACCURACY, VAL_LOSS, VAL_MAE, VAL_MSE, VAL_R2

LOG_LOSS_EPS = 1e-15  # probabilities below this are clipped before the log (as sklearn does)

# Column names of our own, out of the way of the caller's.
_FEATURES = "_baseline_features"
_PREDICTION = "_baseline_prediction"
_PROBABILITY = "_baseline_probability"
_RAW = "_baseline_raw_prediction"
_ONEHOT = "_baseline_onehot_"


@dataclass(frozen=True)
class BaselineResult:
    """One baseline's outcome, ready to log next to the neural model's run."""

    name: str  # e.g. "mllib_logistic_regression"
    metrics: dict[str, float]  # validation metrics, named like the neural model's
    train_seconds: float  # wall time of the fit: feature pipeline, caching, the estimator
    total_seconds: float  # fit and evaluation
    details: dict[str, Any]  # iterations, hyperparameters, sizes; centers for k-means


def logistic_regression(
    train: DataFrame,
    validation: DataFrame,
    *,
    numeric: list[str],
    categorical: dict[str, int],
    label: str,
    num_classes: int,
    max_iter: int = 100,
    reg_param: float = 0.0,
) -> BaselineResult:
    """Fit MLlib's ``LogisticRegression`` on ``train``; accuracy and log loss on ``validation``.

    ``label`` holds class indices in ``[0, num_classes)``; the family is ``"multinomial"`` when
    ``num_classes > 2``, else ``"binomial"``. ``val_loss`` is the mean of ``-log p[label]`` over
    the validation rows, ``p`` the model's ``probability`` clipped below at ``LOG_LOSS_EPS``.
    ``details`` has ``train_accuracy``, the iteration count and the hyperparameters.
    """
    if num_classes < 2:
        raise BaselineError(f"num_classes must be at least 2, not {num_classes}")
    _check_hyperparameters(max_iter, reg_param)
    _check_features(numeric, categorical, label)
    for role, frame in (("training", train), ("validation", validation)):
        _check_schema(frame, role, numeric, categorical, label, integral_label=True)
    start = time.perf_counter()
    features = _features_pipeline(numeric, categorical)
    family = "multinomial" if num_classes > 2 else "binomial"
    estimator = LogisticRegression(
        featuresCol=_FEATURES,
        labelCol=label,
        predictionCol=_PREDICTION,
        probabilityCol=_PROBABILITY,
        rawPredictionCol=_RAW,
        family=family,
        maxIter=max_iter,
        regParam=reg_param,
    )
    fitted = _fit(train, numeric, categorical, label, num_classes, features, estimator)
    classifier = fitted.model.stages[-1]
    train_accuracy = float(classifier.summary.accuracy)  # a pass over the cached frame
    fitted.release()

    truth = F.col(label).cast("int")
    p_true = F.try_element_at(vector_to_array(F.col(_PROBABILITY)), truth + 1)
    aggregates = [
        F.avg((F.col(_PREDICTION) == F.col(label)).cast("double")).alias(VAL_ACCURACY),
        F.avg(-F.log(F.greatest(p_true, F.lit(LOG_LOSS_EPS)))).alias(VAL_LOSS),
    ]
    metrics, val_rows = _evaluate(
        validation, numeric, categorical, label, num_classes, fitted.model, aggregates
    )
    return BaselineResult(
        name="mllib_logistic_regression",
        metrics=metrics,
        train_seconds=fitted.seconds,
        total_seconds=time.perf_counter() - start,
        details={
            "train_accuracy": train_accuracy,
            "family": family,
            "num_classes": num_classes,
            "num_features": int(classifier.numFeatures),
            "iterations": int(classifier.summary.totalIterations),
            "maxIter": max_iter,
            "regParam": reg_param,
            "train_rows": fitted.rows,
            "val_rows": val_rows,
        },
    )


def linear_regression(
    train: DataFrame,
    validation: DataFrame,
    *,
    numeric: list[str],
    categorical: dict[str, int],
    label: str,
    max_iter: int = 100,
    reg_param: float = 0.0,
) -> BaselineResult:
    """Fit MLlib's ``LinearRegression`` on ``train``; MSE, MAE and R² on ``validation``.

    The solver is L-BFGS (``max_iter`` bounds it): one-hot columns beside an intercept are
    collinear, which the normal equations' Cholesky cannot solve. ``val_r2`` is
    ``1 - SSE / SST`` over the validation rows (NaN when the validation target is constant).
    ``details`` has the training MSE and R², the iteration count and the hyperparameters.
    """
    _check_hyperparameters(max_iter, reg_param)
    _check_features(numeric, categorical, label)
    for role, frame in (("training", train), ("validation", validation)):
        _check_schema(frame, role, numeric, categorical, label, integral_label=False)
    start = time.perf_counter()
    estimator = LinearRegression(
        featuresCol=_FEATURES,
        labelCol=label,
        predictionCol=_PREDICTION,
        solver="l-bfgs",
        maxIter=max_iter,
        regParam=reg_param,
    )
    features = _features_pipeline(numeric, categorical)
    fitted = _fit(train, numeric, categorical, label, None, features, estimator)
    regressor = fitted.model.stages[-1]
    summary = regressor.summary
    train_mse, train_r2 = float(summary.meanSquaredError), float(summary.r2)  # cached frame
    fitted.release()

    error = F.col(_PREDICTION) - F.col(label)
    aggregates = [
        F.avg(error * error).alias(VAL_MSE),
        F.avg(F.abs(error)).alias(VAL_MAE),
        F.var_pop(label).alias("variance"),
    ]
    metrics, val_rows = _evaluate(
        validation, numeric, categorical, label, None, fitted.model, aggregates
    )
    variance = metrics.pop("variance")
    metrics[VAL_R2] = 1.0 - metrics[VAL_MSE] / variance if variance > 0 else math.nan
    return BaselineResult(
        name="mllib_linear_regression",
        metrics=metrics,
        train_seconds=fitted.seconds,
        total_seconds=time.perf_counter() - start,
        details={
            "train_mse": train_mse,
            "train_r2": train_r2,
            "num_features": int(regressor.numFeatures),
            "iterations": int(summary.totalIterations),
            "solver": "l-bfgs",
            "maxIter": max_iter,
            "regParam": reg_param,
            "train_rows": fitted.rows,
            "val_rows": val_rows,
        },
    )


def kmeans(
    train: DataFrame, *, features: list[str], k: int, seed: int = 0, max_iter: int = 50
) -> BaselineResult:
    """Fit MLlib's ``KMeans`` (``k-means||`` initialisation, ``seed``) on the ``features`` columns.

    ``train_cost`` is the model's training cost: the sum over the rows of the squared distance to
    the nearest center. ``details`` has the ``centers`` (lists of floats), the rows in each
    cluster, the iteration count and the hyperparameters. ``train`` needs at least ``k`` rows.
    """
    if k < 2:
        raise BaselineError(f"k must be at least 2, not {k}")
    _check_hyperparameters(max_iter, 0.0)
    _check_features(features, {}, None)
    _check_schema(train, "training", features, {}, None, integral_label=False)
    start = time.perf_counter()
    estimator = KMeans(
        featuresCol=_FEATURES,
        predictionCol=_PREDICTION,
        k=k,
        initMode="k-means||",
        seed=seed,
        maxIter=max_iter,
    )
    fitted = _fit(
        train, features, {}, None, None, _features_pipeline(features, {}), estimator, min_rows=k
    )
    model = fitted.model.stages[-1]
    summary = model.summary
    cost = float(summary.trainingCost)
    details = {
        "centers": [[float(x) for x in center] for center in model.clusterCenters()],
        "cluster_sizes": [int(size) for size in summary.clusterSizes],
        "iterations": int(summary.numIter),
        "k": k,
        "seed": seed,
        "initMode": "k-means||",
        "maxIter": max_iter,
        "train_rows": fitted.rows,
    }
    fitted.release()
    return BaselineResult(
        name="mllib_kmeans",
        metrics={TRAIN_COST: cost},
        train_seconds=fitted.seconds,
        total_seconds=time.perf_counter() - start,
        details=details,
    )


# -- checks ----------------------------------------------------------------------------------------


def _check_hyperparameters(max_iter: int, reg_param: float) -> None:
    if max_iter < 1:
        raise BaselineError(f"max_iter must be at least 1, not {max_iter}")
    if not reg_param >= 0:
        raise BaselineError(f"reg_param must be non-negative, not {reg_param}")


def _check_features(numeric: list[str], categorical: dict[str, int], label: str | None) -> None:
    names = [*numeric, *categorical]
    if not names:
        raise BaselineError("no feature columns: give at least one numeric or categorical column")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BaselineError(f"columns {repeated} are listed more than once among the features")
    if label is not None and label in names:
        raise BaselineError(f"label {label!r} is also a feature column")
    for name, cardinality in categorical.items():
        if cardinality < 1:
            raise BaselineError(
                f"categorical column {name!r}: cardinality must be at least 1, not {cardinality}"
            )


def _check_schema(
    frame: DataFrame,
    role: str,
    numeric: list[str],
    categorical: dict[str, int],
    label: str | None,
    *,
    integral_label: bool,
) -> None:
    """Every column present and of a usable Spark type (no Spark job)."""
    types = {field.name: field.dataType for field in frame.schema.fields}
    wanted = [*numeric, *categorical, *([label] if label is not None else [])]
    missing = [c for c in wanted if c not in types]
    if missing:
        raise BaselineError(
            f"{role} frame has no column(s) {missing} (its columns: {sorted(types)})"
        )
    for c in numeric:
        if not isinstance(types[c], (T.NumericType, T.BooleanType)):
            raise BaselineError(
                f"{role} frame: numeric column {c!r} has Spark type {types[c].simpleString()}"
            )
    for c in categorical:
        if not isinstance(types[c], T.IntegralType):
            raise BaselineError(
                f"{role} frame: categorical column {c!r} has Spark type "
                f"{types[c].simpleString()}; it must hold integer vocabulary indices"
            )
    if label is None:
        return
    expected = (T.IntegralType, T.BooleanType) if integral_label else (T.NumericType,)
    if not isinstance(types[label], expected):
        kind = "an integer class index" if integral_label else "a numeric target"
        raise BaselineError(
            f"{role} frame: label {label!r} has Spark type {types[label].simpleString()}; "
            f"it must be {kind}"
        )


def _bad_value(column: str) -> Column:
    value = F.col(column)
    return value.isNull() | F.isnan(value) | (F.abs(value) == float("inf"))


def _check_values(
    frame: DataFrame,
    role: str,
    columns: list[str],
    label: str | None,
    num_classes: int | None,
    min_rows: int,
) -> int:
    """One pass over ``frame`` (prepared: all columns double): its row count, after checking
    that it has ``min_rows``, that no column holds null, NaN or infinity and, with
    ``num_classes``, that every label is a class index."""
    aggs = [F.count(F.lit(1)).alias("rows")]
    aggs += [F.sum(_bad_value(c).cast("long")).alias(f"bad:{c}") for c in columns]
    if label is not None and num_classes is not None:
        value = F.col(label)
        outside = (value < 0) | (value >= num_classes) | (value != F.floor(value))
        aggs.append(F.sum(outside.cast("long")).alias("outside"))
    row = frame.agg(*aggs).first()
    assert row is not None
    stats = row.asDict()
    rows = int(stats["rows"])
    if rows == 0:
        raise BaselineError(f"{role} frame has no rows")
    if rows < min_rows:
        raise BaselineError(f"{role} frame has {rows} rows; at least {min_rows} are needed")
    for c in columns:
        if stats[f"bad:{c}"]:
            raise BaselineError(
                f"{role} frame: column {c!r} has {stats[f'bad:{c}']} null, NaN or infinite values"
            )
    if stats.get("outside"):
        raise BaselineError(
            f"{role} frame: label {label!r} has {stats['outside']} values that are not class "
            f"indices 0..{num_classes - 1}"
        )
    return rows


# -- features, fit, evaluation ---------------------------------------------------------------------


def _nominal(column: str, values: int) -> Column:
    """``column`` as double, marked as a nominal attribute with ``values`` values: MLlib then
    takes the one-hot size (the class count) from it instead of scanning the data."""
    metadata = {"ml_attr": {"type": "nominal", "name": column, "num_vals": values}}
    return F.col(column).cast("double").alias(column, metadata=metadata)


def _prepared(
    frame: DataFrame,
    numeric: list[str],
    categorical: dict[str, int],
    label: str | None,
    num_classes: int | None,
) -> DataFrame:
    """Only the columns used, all double; categorical indices (and the label, with
    ``num_classes``) marked nominal with their number of values."""
    columns = [F.col(c).cast("double").alias(c) for c in numeric]
    columns += [_nominal(c, cardinality) for c, cardinality in categorical.items()]
    if label is not None:
        columns.append(
            _nominal(label, num_classes)
            if num_classes is not None
            else F.col(label).cast("double").alias(label)
        )
    return frame.select(*columns)


def _features_pipeline(numeric: list[str], categorical: dict[str, int]) -> Pipeline:
    """Numeric columns as they are, each categorical index one-hot (an index outside the
    cardinality, if any, in an extra slot), assembled into ``_FEATURES``."""
    stages: list[Any] = []
    encoded = [_ONEHOT + c for c in categorical]
    if categorical:
        stages.append(
            OneHotEncoder(
                inputCols=list(categorical),
                outputCols=encoded,
                dropLast=False,
                handleInvalid="keep",
            )
        )
    # "keep": a bad value becomes NaN instead of failing the job; _check_values raises first.
    stages.append(
        VectorAssembler(inputCols=[*numeric, *encoded], outputCol=_FEATURES, handleInvalid="keep")
    )
    return Pipeline(stages=stages)


@dataclass
class _Fitted:
    model: PipelineModel  # the feature stages and the fitted estimator
    frame: DataFrame  # the cached, assembled training frame
    rows: int
    seconds: float

    def release(self) -> None:
        self.frame.unpersist()


def _fit(
    train: DataFrame,
    numeric: list[str],
    categorical: dict[str, int],
    label: str | None,
    num_classes: int | None,
    features: Pipeline,
    estimator: Any,
    min_rows: int = 1,
) -> _Fitted:
    """Assemble ``train``, cache it, check it in the pass that fills the cache, fit ``estimator``.

    The caller reads the model's training summary (while the frame is cached), then calls
    :meth:`_Fitted.release`; on an error here the frame is released already.
    """
    start = time.perf_counter()
    prepared = _prepared(train, numeric, categorical, label, num_classes)
    feature_model = features.fit(prepared)  # no pass: cardinalities come from the metadata
    assembled = feature_model.transform(prepared).select(*prepared.columns, _FEATURES).cache()
    try:
        rows = _check_values(
            assembled, "training", [*numeric, *categorical], label, num_classes, min_rows
        )
        fitted = estimator.fit(assembled)
    except BaseException:
        assembled.unpersist()
        raise
    stages: list[Transformer] = [*feature_model.stages, fitted]
    model = PipelineModel(stages=stages)
    return _Fitted(model, assembled, rows, time.perf_counter() - start)


def _evaluate(
    validation: DataFrame,
    numeric: list[str],
    categorical: dict[str, int],
    label: str,
    num_classes: int | None,
    model: PipelineModel,
    aggregates: list[Column],
) -> tuple[dict[str, float], int]:
    """Check ``validation``, then compute ``aggregates`` over the model's predictions on it
    (the prepared frame cached between the two passes); the metrics and the row count."""
    prepared = _prepared(validation, numeric, categorical, label, num_classes).cache()
    try:
        rows = _check_values(
            prepared, "validation", [*numeric, *categorical], label, num_classes, 1
        )
        row = model.transform(prepared).agg(*aggregates).first()
    finally:
        prepared.unpersist()
    assert row is not None
    return {name: float(value) for name, value in row.asDict().items()}, rows


def for_pipeline(
    train: DataFrame, validation: DataFrame, spec: Any, cfg: PipelineConfig
) -> BaselineResult:
    """The baseline that fits the pipeline's task, on its prepared split (``spec``: the
    :class:`~lepton_spark.spec.FeatureSpec` ETL made): logistic regression, linear regression
    or k-means with the model's ``k``."""
    supervised = {
        "numeric": spec.numeric,
        "categorical": {c.name: c.cardinality for c in spec.categorical},
        "label": spec.label,
        "max_iter": cfg.baseline.max_iter,
    }
    if spec.task == "classification":
        return logistic_regression(train, validation, num_classes=spec.num_classes, **supervised)
    if spec.task == "regression":
        return linear_regression(train, validation, **supervised)
    return kmeans(
        train,
        features=spec.numeric,
        k=int(cfg.model.options.get("k", 8)),
        seed=cfg.train.seed,
        max_iter=cfg.baseline.max_iter,
    )
