"""Distributed scoring: a logged model over a Spark DataFrame, Arrow batches in and out.

The model folder is zipped and added to the session's artifacts once
(``SparkSession.addArtifacts(file=True)``: ``SparkContext.addFile`` on classic Spark, an upload
on Spark Connect). Each executor Python worker unpacks and loads it once, the first time a task
runs there, and keeps it for every later batch and task (Spark reuses its Python workers);
batches arrive as Arrow record batches (``mapInArrow``) and go through the model's own
preprocessing (:class:`lepton_spark.serving.scorer.Scorer`) without pandas. One code path for
classic Spark and Spark Connect.

Two uses: :func:`score` (``lepton-spark score``: keys and predictions written as Parquet and
committed by :mod:`lepton_spark.serving.output`, so a failed job leaves the previous output as it
was, on local disks, HDFS and object stores alike) and :func:`scored_frame` with
``spark_ml=True`` (``TorchModel.transform``: every input column, then
``rawPrediction``/``probability`` vectors and a double ``prediction``, as Spark ML's evaluators
expect).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, Observation
from pyspark.sql import functions as F
from pyspark.sql import types as T

from lepton_spark.data.columns import is_vector
from lepton_spark.errors import ScoringError
from lepton_spark.serving.output import check_destination, commit, writer
from lepton_spark.serving.scorer import (
    SPEC_FILE,
    Scorer,
    invalid_summary,
    kept_rows,
    list_column,
    load_scorer,
    output_columns,
)
from lepton_spark.shards.storage import locate
from lepton_spark.sparkinfo import Session, is_connect
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)

_LOADED = "_lepton_loaded"  # 1 on the first row a Python worker scored after loading the model
_BATCH = "_lepton_batch"  # 1 on the first row of every Arrow batch
_ARRAY = "_lepton_array_"  # + a vector feature's name: the vector as an array, for the model


@dataclass(frozen=True)
class ScoreResult:
    model_uri: str
    output: str
    rows: int  # rows written
    batches: int
    model_loads: int  # executor Python workers that loaded the model (not batches)
    seconds: float
    keys: list[str]
    handle_invalid: str = "keep"  # what became of the invalid rows
    invalid_rows: int = 0  # input rows with an invalid feature
    invalid: dict[str, int] = field(default_factory=dict)  # invalid rows per column

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


# -- the model on the executors --------------------------------------------------------------------


@dataclass(frozen=True)
class ShippedModel:
    """A model folder added to a session's artifacts, under a name of its own."""

    archive: str  # the artifact's file name (the workers' cache is keyed by it)
    spec: FeatureSpec


_ARCHIVES = Path(tempfile.mkdtemp(prefix="lepton-shipped-"))  # classic Spark serves from here
atexit.register(shutil.rmtree, _ARCHIVES, True)


def ship(spark: Session, model_dir: Path) -> ShippedModel:
    """Zip ``model_dir`` (a downloaded lepton-spark model) and add it to ``spark``'s artifacts.

    A name of its own per call: Spark refuses a second file of the same name, and the workers'
    cache is keyed by it (``models:/NAME@champion`` may be another version tomorrow). The zip
    stays until this process ends (classic Spark serves it from the driver when a task asks).
    """
    spec = FeatureSpec.model_validate_json((model_dir / "artifacts" / SPEC_FILE).read_text())
    archive = Path(
        shutil.make_archive(str(_ARCHIVES / f"model-{uuid.uuid4().hex}"), "zip", model_dir)
    )
    spark.addArtifacts(str(archive), file=True)
    if is_connect(spark):  # uploaded: the server has its copy
        archive.unlink(missing_ok=True)
    return ShippedModel(archive.name, spec)


# One model per executor Python worker and model archive: loaded by the first batch, kept. A
# long-lived worker that scores many models (a notebook transforming one model after another)
# keeps the most recent few, not all of them.
_SCORERS: OrderedDict[str, Scorer] = OrderedDict()
_KEEP_SCORERS = 4
_LOCK = threading.Lock()


def _worker_scorer(archive: str, threads: int, handle_invalid: str) -> tuple[Scorer, bool]:
    """This Python worker's scorer for ``archive`` under ``handle_invalid``, and whether it was
    loaded just now."""
    with _LOCK:
        scorer = _SCORERS.get(archive)
        if scorer is not None:
            _SCORERS.move_to_end(archive)
            return scorer.with_policy(handle_invalid), False
        import torch
        from pyspark import SparkFiles

        torch.set_num_threads(threads)
        target = Path(tempfile.gettempdir()) / f"lepton-model-{Path(archive).stem}"
        target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:8]}")
        with zipfile.ZipFile(SparkFiles.get(archive)) as zipped:
            zipped.extractall(target)
        scorer = load_scorer(target)
        shutil.rmtree(target, ignore_errors=True)  # the model is in memory now
        _SCORERS[archive] = scorer
        while len(_SCORERS) > _KEEP_SCORERS:
            _SCORERS.popitem(last=False)
        return scorer.with_policy(handle_invalid), True


# -- scoring a DataFrame ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SparkMLColumns:
    """Spark ML's output columns (``TorchModel``'s params): Spark's own names by default."""

    prediction: str = "prediction"
    probability: str = "probability"
    raw_prediction: str = "rawPrediction"


def scored_frame(
    df: DataFrame,
    model: ShippedModel,
    *,
    keys: list[str] | None = None,
    spark_ml: SparkMLColumns | None = None,
    threads: int = 1,
    partitions: int | None = None,
    counters: bool = False,
    handle_invalid: str | None = None,
    observation: Observation | None = None,
) -> DataFrame:
    """``df`` scored by the shipped model, lazily (nothing runs until an action).

    ``handle_invalid``: what becomes of a row training would have refused (``keep``: null
    predictions, ``skip``: left out, ``error``, ``fill``; default: the model's own policy).
    ``observation``: receives the input's invalid rows (``invalid``, and ``invalid:<column>``)
    when the frame runs.

    ``spark_ml``: every input column, then Spark ML's columns (a double ``prediction``;
    ``rawPrediction`` and ``probability`` vectors for classification; an integer cluster for
    k-means). Otherwise: the ``keys`` columns, then lepton-spark's own (``prediction``, and
    ``probabilities`` or ``distances``). ``counters`` adds two marker columns that
    :func:`score` observes and drops (model loads, Arrow batches).
    """
    spec = model.spec
    missing = [c for c in spec.input_columns if c not in df.columns]
    if missing:
        raise ScoringError(
            f"the input lacks the model's columns {missing} (it has {df.columns}; the model "
            f"reads {spec.input_columns})"
        )
    passed = list(df.columns) if spark_ml else list(keys or [])
    if spark_ml is not None:
        taken = [f.name for f in _output_fields(spec, spark_ml) if f.name in df.columns]
        if taken:
            raise ScoringError(
                f"the input already has column(s) {taken}: drop them or set the model's "
                "predictionCol / probabilityCol / rawPredictionCol to other names"
            )
    from pyspark.ml.functions import vector_to_array

    arrays = _vector_features(df, spec)
    features = [c for c in spec.input_columns if c not in passed and c not in arrays]
    selected = df.select(
        *passed,
        *features,
        *[F.col(name) for name in arrays if name not in passed],
        *[vector_to_array(F.col(name)).alias(_ARRAY + name) for name in arrays],
    )
    if partitions:
        selected = selected.repartition(partitions)
    if observation is not None:
        selected = selected.observe(observation, *_invalid_counts(spec, arrays))
    policy = spec.check_invalid_policy(handle_invalid) if handle_invalid else spec.invalid_policy
    outputs = _output_fields(spec, spark_ml)
    if counters:
        outputs += [T.StructField(_LOADED, T.ByteType(), False)]
        outputs += [T.StructField(_BATCH, T.ByteType(), False)]
    schema = T.StructType([*(df.schema[c] for c in passed), *outputs])
    scoring = _scoring(model.archive, threads, passed, arrays, spark_ml, counters, policy)
    scored = selected.mapInArrow(scoring, schema)
    if spark_ml is None or spec.task != "classification":
        return scored
    from pyspark.ml.functions import array_to_vector

    vectors = {spark_ml.raw_prediction, spark_ml.probability}
    # A row kept unscored (handleInvalid keep) has null arrays: null vectors (array_to_vector
    # fails on a null).
    return scored.select(
        *[
            F.when(F.col(c).isNotNull(), array_to_vector(c)).alias(c) if c in vectors else F.col(c)
            for c in scored.columns
        ]
    )


def _vector_features(df: DataFrame, spec: FeatureSpec) -> list[str]:
    """The model's array features that the input holds as Spark ML vectors (a struct in Arrow:
    the model gets a plain array of them)."""
    return [a.name for a in spec.arrays if is_vector(df.schema[a.name].dataType)]


_LEPTON_TYPES = {
    "bigint": T.LongType(),
    "double": T.DoubleType(),
    "array<float>": T.ArrayType(T.FloatType(), False),
}


def _output_fields(spec: FeatureSpec, spark_ml: SparkMLColumns | None) -> list[T.StructField]:
    if spark_ml is None:
        return [T.StructField(n, _LEPTON_TYPES[t], True) for n, t in output_columns(spec)]
    # Nullable: handleInvalid 'keep' gives a row training would have refused null predictions.
    vector = T.ArrayType(T.DoubleType(), False)  # made a vector after the Arrow pass
    if spec.task == "classification":
        return [
            T.StructField(spark_ml.raw_prediction, vector, True),
            T.StructField(spark_ml.probability, vector, True),
            T.StructField(spark_ml.prediction, T.DoubleType(), True),
        ]
    if spec.task == "regression":
        return [T.StructField(spark_ml.prediction, T.DoubleType(), True)]
    return [T.StructField(spark_ml.prediction, T.IntegerType(), True)]


INVALID = "invalid"  # an observation's count of input rows with an invalid feature


def _invalid_counts(spec: FeatureSpec, arrays: list[str]) -> list[Column]:
    """Aggregates over the selected input: rows with an invalid feature (``invalid``) and per
    column (``invalid:<column>``), as the scorer judges them (``serving/preprocess``)."""
    from lepton_spark.data.quality import bad_array, bad_value

    bad = {c: bad_value(c) for c in spec.numeric}
    for a in spec.arrays:
        column = _ARRAY + a.name if a.name in arrays else a.name
        bad[a.name] = bad_array(column) | (F.size(column) != a.length)
    if not bad:
        return [F.lit(0).cast("long").alias(INVALID)]
    anything = F.lit(False)
    for flag in bad.values():
        anything = anything | flag
    return [
        F.sum(anything.cast("long")).alias(INVALID),
        *(F.sum(flag.cast("long")).alias(f"{INVALID}:{c}") for c, flag in bad.items()),
    ]


def invalid_counts(df: DataFrame, spec: FeatureSpec) -> tuple[int, dict[str, int]]:
    """``df``'s rows with an invalid feature, and per column (one aggregate job)."""
    arrays = _vector_features(df, spec)
    from pyspark.ml.functions import vector_to_array

    selected = df.select(
        *[c for c in spec.input_columns if c not in arrays],
        *[vector_to_array(F.col(name)).alias(_ARRAY + name) for name in arrays],
    )
    row = selected.agg(*_invalid_counts(spec, arrays)).first()
    return _counted(row.asDict() if row is not None else {})


def _counted(values: dict) -> tuple[int, dict[str, int]]:
    prefix = INVALID + ":"
    per_column = {k[len(prefix) :]: int(v or 0) for k, v in values.items() if k.startswith(prefix)}
    return int(values.get(INVALID) or 0), {c: n for c, n in per_column.items() if n}


def _scoring(
    archive: str,
    threads: int,
    passed: list[str],
    arrays: list[str],
    spark_ml: SparkMLColumns | None,
    counters: bool,
    handle_invalid: str,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function: load the model once per worker, score every batch."""

    def score_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer, fresh = _worker_scorer(archive, threads, handle_invalid)
        for batch in batches:
            inputs = batch
            for name in arrays:  # the model reads the vector as the plain array next to it
                index = inputs.schema.get_field_index(name)
                inputs = inputs.set_column(index, name, inputs.column(_ARRAY + name))
            if spark_ml is None:
                predicted, _ = scorer.predict_arrow(inputs, passed, source=batch)
            else:
                predicted = _spark_ml_batch(scorer, inputs, batch, passed, spark_ml)
            if counters:
                predicted = _with_counters(predicted, fresh)
                fresh = False
            yield predicted

    return score_batches


def _spark_ml_batch(
    scorer: Scorer,
    inputs: pa.RecordBatch,
    batch: pa.RecordBatch,
    passed: list[str],
    columns: SparkMLColumns,
) -> pa.RecordBatch:
    """``passed`` columns of ``batch`` as they came (vectors too), then Spark ML's columns."""
    scored = scorer.score(inputs)
    predicted = scorer.predict_spark_ml(scored)
    names = {
        "raw": columns.raw_prediction,
        "probability": columns.probability,
        "prediction": columns.prediction,
    }
    nulls = scored.null_rows
    arrays = []
    for values in predicted.values():
        full = scored.spread(values)
        arrays.append(
            pa.array(full, mask=nulls) if full.ndim == 1 else list_column(full, np.float64, nulls)
        )
    kept = kept_rows(batch, scored)
    return pa.RecordBatch.from_arrays(
        [*(kept.column(name) for name in passed), *arrays],
        names=[*passed, *(names[k] for k in predicted)],
    )


def _with_counters(batch: pa.RecordBatch, fresh: bool) -> pa.RecordBatch:
    loaded = np.zeros(batch.num_rows, dtype=np.int8)
    first = np.zeros(batch.num_rows, dtype=np.int8)
    if batch.num_rows:
        loaded[0] = 1 if fresh else 0
        first[0] = 1
    return pa.RecordBatch.from_arrays(
        [*batch.columns, pa.array(loaded), pa.array(first)],
        names=[*batch.schema.names, _LOADED, _BATCH],
    )


# -- lepton-spark score ----------------------------------------------------------------------------


def read_input(spark: Session, where: str, fmt: str | None = None) -> DataFrame:
    """A path (its format from ``fmt`` or the extension, Parquet by default) or a table name."""
    local = not is_connect(spark)  # a Connect client's paths are the server's
    looks_like_path = "/" in where or "://" in where or (local and Path(where).exists())
    try:
        if not looks_like_path:
            df = spark.table(where)
        else:
            if local and "://" not in where and not Path(where).exists():
                raise ScoringError(f"--input {where} does not exist")
            fmt = fmt or {".csv": "csv", ".json": "json", ".orc": "orc"}.get(
                Path(where).suffix.lower(), "parquet"
            )
            reader = spark.read.format(fmt)
            if fmt == "csv":
                reader = reader.option("header", "true").option("inferSchema", "true")
            df = reader.load(where)
        _ = df.schema  # a Connect client learns of a missing input only when it asks
        return df
    except AnalysisException as err:
        raise ScoringError(f"--input {where}: {str(err).splitlines()[0]}") from None


def download(model_uri: str, folder: Path, tracking_uri: str | None = None) -> Path:
    """The model at ``model_uri`` in a local folder (checked to be a lepton-spark model).

    ``tracking_uri`` (and the registry behind it) instead of the process's current one, which is
    back as it was afterwards. (MLflow resolves a logged model's ``models:/m-…`` through the
    current tracking URI whatever ``tracking_uri`` it is given: hence the switch.)
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    switch = _use_tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext()
    try:
        with switch:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    model_uri,
                    dst_path=str(folder),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
            )
    except MlflowException as err:
        raise ScoringError(f"--model {model_uri}: {err.message}") from None
    if not (local / "artifacts" / SPEC_FILE).is_file():
        raise ScoringError(
            f"--model {model_uri} is not a lepton-spark model (no artifacts/{SPEC_FILE})"
        )
    return local


def score(
    spark: Session,
    model_uri: str,
    input_path: str,
    output: str,
    *,
    keys: list[str] | None = None,
    input_format: str | None = None,
    overwrite: bool = False,
    threads_per_task: int = 1,
    partitions: int | None = None,
    handle_invalid: str | None = None,
) -> ScoreResult:
    """Score ``input_path`` (a path or table) with ``model_uri``; write Parquet to ``output``.

    ``keys``: input columns copied to the output beside the prediction (default: every input
    column that is not a model feature). ``partitions``: repartition the input first (default:
    as it is read). ``handle_invalid``: what becomes of a row training would have refused
    (``keep``, ``skip``, ``error``, ``fill``; default: the model's own policy); ``error`` counts
    them first and writes nothing when there are any.
    """
    destination = locate(output)
    check_destination(destination, overwrite)
    df = read_input(spark, input_path, input_format)
    with tempfile.TemporaryDirectory(prefix="lepton-score-") as tmp:
        local = download(model_uri, Path(tmp))
        shipped = ship(spark, local)
    spec = shipped.spec
    if keys is None:
        keys = [c for c in df.columns if c not in spec.input_columns]
    unknown = [k for k in keys if k not in df.columns]
    if unknown:
        raise ScoringError(f"--key {unknown} not in the input (columns: {df.columns})")
    clash = [k for k in keys if k in dict(output_columns(spec))]
    if clash:
        raise ScoringError(f"input column(s) {clash} would clash with the output's columns")
    try:
        policy = spec.check_invalid_policy(handle_invalid) if handle_invalid else None
    except ValueError as err:
        raise ScoringError(f"--invalid: {err}") from None
    policy = policy or spec.invalid_policy
    if policy == "error":
        total, per_column = invalid_counts(df, spec)
        if total:
            raise ScoringError(
                f"--input {input_path}: {total:,} rows have invalid features (null, NaN or "
                f"infinite numbers, broken arrays; rows per column: "
                f"{invalid_summary(per_column)}) and --invalid is 'error': nothing was written "
                "(--invalid keep or skip scores the rest)"
            )
    invalid = Observation("lepton-invalid")
    try:
        scored = scored_frame(
            df,
            shipped,
            keys=keys,
            threads=threads_per_task,
            partitions=partitions,
            counters=True,
            handle_invalid=policy,
            observation=invalid,
        )
    except ScoringError as err:
        raise ScoringError(f"--input {input_path}: {err}") from None
    observed = Observation("lepton-score")
    counted = scored.observe(
        observed,
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.col(_LOADED).cast("long")).alias("loads"),
        F.sum(F.col(_BATCH).cast("long")).alias("batches"),
    ).drop(_LOADED, _BATCH)
    started = time.perf_counter()
    written = commit(
        writer(counted, destination),
        destination,
        {"model_uri": model_uri, "input": input_path, "keys": keys},
    )
    seconds = time.perf_counter() - started
    counts = observed.get
    invalid_rows, per_column = _counted(invalid.get)
    result = ScoreResult(
        model_uri=model_uri,
        output=written,
        rows=int(counts.get("rows") or 0),
        batches=int(counts.get("batches") or 0),
        model_loads=int(counts.get("loads") or 0),
        seconds=seconds,
        keys=keys,
        handle_invalid=policy,
        invalid_rows=invalid_rows,
        invalid=per_column,
    )
    log.debug(
        "scored %d rows in %.1f s (%d Arrow batches, model loaded by %d Python worker(s)) → %s",
        result.rows,
        seconds,
        result.batches,
        result.model_loads,
        written,
    )
    return result
