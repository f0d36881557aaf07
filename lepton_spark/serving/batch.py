"""Distributed batch scoring: a logged model over a Spark table, Arrow batches in, Parquet out.

The driver downloads the model once and ships it to the executors as one archive
(``SparkContext.addFile``). Each executor Python worker unpacks and loads it once, the first time
a task of the job runs there, and keeps it for every later batch and task (Spark reuses its
Python workers); batches arrive as Arrow record batches (``mapInArrow``) and go through the
model's own preprocessing (:class:`lepton_spark.serving.scorer.Scorer`) without pandas. The
output is written to a temporary folder next to ``output`` and moved into place when the job has
finished: a failed job leaves the previous output (if any) as it was.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.utils import AnalysisException

from lepton_spark.data.columns import is_vector
from lepton_spark.errors import ScoringError
from lepton_spark.serving.scorer import SPEC_FILE, Scorer, load_scorer, output_columns
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    model_uri: str
    output: str
    rows: int
    batches: int
    model_loads: int  # executor Python workers that loaded the model (not batches)
    seconds: float
    keys: list[str]

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


# One model per executor Python worker and model archive: loaded by the first batch, kept.
_SCORERS: dict[str, Scorer] = {}
_LOCK = threading.Lock()


def _worker_scorer(archive: str, threads: int, loads: Any) -> Scorer:
    with _LOCK:
        scorer = _SCORERS.get(archive)
        if scorer is None:
            import torch
            from pyspark import SparkFiles

            torch.set_num_threads(threads)
            target = (
                Path(tempfile.gettempdir())
                / f"lepton-model-{Path(archive).stem}-{uuid.uuid4().hex[:8]}"
            )
            with zipfile.ZipFile(SparkFiles.get(archive)) as zipped:
                zipped.extractall(target)
            scorer = load_scorer(target)
            shutil.rmtree(target, ignore_errors=True)  # the model is in memory now
            _SCORERS[archive] = scorer
            loads.add(1)
        return scorer


def read_input(spark: SparkSession, where: str, fmt: str | None = None) -> DataFrame:
    """A path (its format from ``fmt`` or the extension, Parquet by default) or a table name."""
    looks_like_path = "/" in where or "://" in where or Path(where).exists()
    try:
        if not looks_like_path:
            return spark.table(where)
        if "://" not in where and not Path(where).exists():
            raise ScoringError(f"--input {where} does not exist")
        fmt = fmt or {".csv": "csv", ".json": "json", ".orc": "orc"}.get(
            Path(where).suffix.lower(), "parquet"
        )
        reader = spark.read.format(fmt)
        if fmt == "csv":
            reader = reader.option("header", "true").option("inferSchema", "true")
        return reader.load(where)
    except AnalysisException as err:
        raise ScoringError(f"--input {where}: {str(err).splitlines()[0]}") from None


def _download(model_uri: str, folder: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))
    except MlflowException as err:
        raise ScoringError(f"--model {model_uri}: {err.message}") from None
    if not (local / "artifacts" / SPEC_FILE).is_file():
        raise ScoringError(
            f"--model {model_uri} is not a lepton-spark model (no artifacts/feature_spec.json)"
        )
    return local


_SPARK_TYPES = {
    "bigint": T.LongType(),
    "double": T.DoubleType(),
    "array<float>": T.ArrayType(T.FloatType(), False),
}


def output_schema(df: DataFrame, keys: list[str], spec: FeatureSpec) -> T.StructType:
    """The key columns as the input has them, then the model's prediction columns."""
    predicted = [T.StructField(n, _SPARK_TYPES[t], False) for n, t in output_columns(spec)]
    return T.StructType([*(df.schema[k] for k in keys), *predicted])


def score(
    spark: SparkSession,
    model_uri: str,
    input_path: str,
    output: str,
    *,
    keys: list[str] | None = None,
    input_format: str | None = None,
    overwrite: bool = False,
    threads_per_task: int = 1,
    partitions: int | None = None,
) -> ScoreResult:
    """Score ``input_path`` (a path or table) with ``model_uri``; write Parquet to ``output``.

    ``keys``: input columns copied to the output beside the prediction (default: every input
    column that is not a model feature). ``partitions``: repartition the input first (default:
    as it is read).
    """
    destination = locate(output)
    if destination.exists() and not overwrite:
        raise ScoringError(f"--output {output} exists; --overwrite replaces it")
    df = read_input(spark, input_path, input_format)
    with tempfile.TemporaryDirectory(prefix="lepton-score-") as tmp:
        local = _download(model_uri, Path(tmp))
        spec = FeatureSpec.model_validate_json((local / "artifacts" / SPEC_FILE).read_text())
        missing = [c for c in spec.input_columns if c not in df.columns]
        if missing:
            raise ScoringError(
                f"--input {input_path} lacks the model's columns {missing} "
                f"(it has {df.columns}; the model reads {spec.input_columns})"
            )
        if keys is None:
            keys = [c for c in df.columns if c not in spec.input_columns]
        unknown = [k for k in keys if k not in df.columns]
        if unknown:
            raise ScoringError(f"--key {unknown} not in the input (columns: {df.columns})")
        clash = [k for k in keys if k in dict(output_columns(spec))]
        if clash:
            raise ScoringError(f"input column(s) {clash} would clash with the output's columns")
        # A name of its own per call: Spark refuses a second file of the same name, and the
        # workers' cache is keyed by it (models:/NAME@champion may be another version tomorrow).
        archive = Path(
            shutil.make_archive(str(Path(tmp) / f"model-{uuid.uuid4().hex}"), "zip", local)
        )
        spark.sparkContext.addFile(str(archive))
        return _run(
            spark,
            df,
            spec,
            keys,
            archive.name,
            destination,
            overwrite,
            model_uri,
            threads_per_task,
            partitions,
        )


def _run(
    spark: SparkSession,
    df: DataFrame,
    spec: FeatureSpec,
    keys: list[str],
    archive: str,
    destination: Location,
    overwrite: bool,
    model_uri: str,
    threads: int,
    partitions: int | None,
) -> ScoreResult:
    sc = spark.sparkContext
    loads, batches, rows = sc.accumulator(0), sc.accumulator(0), sc.accumulator(0)
    features = [c for c in spec.input_columns if c not in keys]

    def score_batches(batches_in: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = _worker_scorer(archive, threads, loads)
        for batch in batches_in:
            batches.add(1)
            rows.add(batch.num_rows)
            yield scorer.predict_arrow(batch, keys)

    for a in spec.arrays:  # a Spark ML vector reaches Arrow as a struct: make it an array
        if a.name in features and is_vector(df.schema[a.name].dataType):
            from pyspark.ml.functions import vector_to_array

            df = df.withColumn(a.name, vector_to_array(F.col(a.name)))
    selected = df.select(*keys, *features)
    if partitions:
        selected = selected.repartition(partitions)
    scored = selected.mapInArrow(score_batches, output_schema(df, keys, spec))
    staging = _staging(destination)
    started = time.perf_counter()
    try:
        # A local path as a file: URI, so that a cluster whose default filesystem is HDFS
        # writes where the user asked.
        scored.write.parquet(Path(staging.path).as_uri() if staging.is_local else staging.uri)
        _replace(staging, destination, overwrite)
    finally:
        if staging.exists():
            staging.delete_folder()
    seconds = time.perf_counter() - started
    result = ScoreResult(
        model_uri=model_uri,
        output=destination.uri,
        rows=rows.value,
        batches=batches.value,
        model_loads=loads.value,
        seconds=seconds,
        keys=keys,
    )
    log.debug(
        "scored %d rows in %.1f s (%d Arrow batches, model loaded by %d Python worker(s)) → %s",
        result.rows,
        seconds,
        result.batches,
        result.model_loads,
        destination.uri,
    )
    return result


def _staging(destination: Location) -> Location:
    """A hidden sibling of ``destination`` (same filesystem: the final move is a rename)."""
    name = f".{destination.path.rstrip('/').rsplit('/', 1)[-1]}.scoring-{uuid.uuid4().hex[:8]}"
    parent_path = destination.path.rstrip("/").rsplit("/", 1)[0]
    base, sep, query = destination.uri.partition("?")
    parent_uri = base.rstrip("/").rsplit("/", 1)[0]
    return Location(destination.fs, f"{parent_path}/{name}", f"{parent_uri}/{name}{sep}{query}")


def _replace(staging: Location, destination: Location, overwrite: bool) -> None:
    """Move the finished output into place; an old one is removed only now (``overwrite``)."""
    if destination.exists():
        if not overwrite:
            raise ScoringError(f"--output {destination.uri} appeared while scoring; kept as is")
        destination.delete_folder()
    destination.fs.move(staging.path, destination.path)
