"""``TorchModel``: the ``pyspark.ml`` Model a ``TorchEstimator`` fit returns.

``transform(df)`` scores through the distributed scoring path (the model shipped once, loaded once
per Python worker, Arrow batches through ``mapInArrow``) and adds Spark ML's columns:
``rawPrediction`` and ``probability`` vectors and a double ``prediction`` for classification, a
double ``prediction`` for regression, an integer cluster for k-means, so that Spark's evaluators
work on its output as they are. ``save(path)`` writes the Spark ML metadata and the model's own
files (through Spark: any path Spark can write, on classic or Connect); ``load(path)`` reads them
back, no MLflow needed. ``TorchModel.from_mlflow("models:/name@champion")`` takes a registered
model.

A row whose features training would have refused (a null, NaN or infinite number, a broken array)
is handled by ``handleInvalid``, Spark ML's param: ``keep`` (the row stays, its prediction columns
null), ``skip`` (left out), ``error`` (``transform`` fails, naming the columns and rows) or
``fill`` (a model trained with ``nulls: fill``: filled as training did). Unset, the model's own
policy: ``keep`` for a model trained with ``nulls: drop`` or ``fail``, ``fill`` for ``nulls:
fill``. ``transform`` counts such rows first (one aggregate over the input) and warns with the
count per column.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from pyspark.ml import Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasHandleInvalid,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
)
from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import DataFrame

from lepton_spark.errors import ScoringError
from lepton_spark.serving.batch import (
    ShippedModel,
    SparkMLColumns,
    download,
    invalid_counts,
    scored_frame,
    ship,
)
from lepton_spark.serving.scorer import POLICY_OUTCOME, SPEC_FILE, invalid_summary
from lepton_spark.spec import INVALID_POLICIES, FeatureSpec

log = logging.getLogger(__name__)

_DOWNLOADS = Path(tempfile.mkdtemp(prefix="lepton-models-"))
atexit.register(shutil.rmtree, _DOWNLOADS, True)
MODEL_FOLDER = "model"  # under a saved TorchModel's path: the model's files, as Parquet rows
_CHUNK = 4 << 20


class TorchModel(
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasHandleInvalid,
    Model,
    MLReadable,
    MLWritable,
):
    """A trained lepton-spark model as a Spark ML transformer; see the module docstring."""

    modelUri: Param[str] = Param(
        Params._dummy(),
        "modelUri",
        "the MLflow model (runs:/..., models:/name@alias, models:/m-...)",
        typeConverter=TypeConverters.toString,
    )
    runId: Param[str] = Param(
        Params._dummy(), "runId", "the MLflow run that trained it", TypeConverters.toString
    )
    trackingUri: Param[str] = Param(
        Params._dummy(), "trackingUri", "where that run is tracked", TypeConverters.toString
    )

    def __init__(
        self,
        *,
        modelUri: str | None = None,
        runId: str | None = None,
        trackingUri: str | None = None,
        predictionCol: str = "prediction",
        probabilityCol: str = "probability",
        rawPredictionCol: str = "rawPrediction",
        handleInvalid: str | None = None,
    ) -> None:
        super().__init__()
        self._set(
            modelUri=modelUri,
            runId=runId,
            trackingUri=trackingUri,
            predictionCol=predictionCol,
            probabilityCol=probabilityCol,
            rawPredictionCol=rawPredictionCol,
        )
        if handleInvalid is not None:
            self.setHandleInvalid(handleInvalid)
        self.history: list[dict[str, float]] = []  # the fit's epochs (not kept by from_mlflow)
        self.metrics: dict[str, float] = {}  # the last epoch's
        self._local: Path | None = None
        # The model shipped to each session it transformed a DataFrame of, shared with copies
        # (Spark ML copies a model for every transform with other params): shipped once.
        self._shipped: weakref.WeakKeyDictionary[Any, ShippedModel] = weakref.WeakKeyDictionary()

    @classmethod
    def from_mlflow(cls, model_uri: str, tracking_uri: str | None = None) -> TorchModel:
        """A model from MLflow: ``models:/name@champion``, ``models:/name/3``, ``runs:/ID/...``."""
        import mlflow

        model = cls(modelUri=model_uri, trackingUri=tracking_uri or mlflow.get_tracking_uri())
        model.local_model()  # fails now, naming the URI, if it is not a lepton-spark model
        return model

    @property
    def feature_spec(self) -> FeatureSpec:
        """The columns it reads and how (see :mod:`lepton_spark.spec`)."""
        text = (self.local_model() / "artifacts" / SPEC_FILE).read_text()
        return FeatureSpec.model_validate_json(text)

    def local_model(self) -> Path:
        """The model's files in a local folder (downloaded from MLflow the first time)."""
        if self._local is None:
            if not self.isSet(self.modelUri):
                raise ValueError(
                    "TorchModel: modelUri is not set (fit a TorchEstimator, or use "
                    "TorchModel.from_mlflow / TorchModel.load)"
                )
            uri = self.getOrDefault(self.trackingUri) if self.isSet(self.trackingUri) else None
            folder = Path(tempfile.mkdtemp(dir=_DOWNLOADS))
            self._local = download(self.getOrDefault(self.modelUri), folder, tracking_uri=uri)
        return self._local

    def setHandleInvalid(self, value: str) -> TorchModel:
        """``keep`` | ``skip`` | ``error`` | ``fill`` (see the module docstring)."""
        if value not in INVALID_POLICIES:
            raise ValueError(
                f"TorchModel: handleInvalid={value!r}: one of {', '.join(INVALID_POLICIES)}"
            )
        return self._set(handleInvalid=value)

    def invalid_policy(self) -> str:
        """What ``transform`` does with invalid rows: ``handleInvalid``, or the model's own."""
        spec = self.feature_spec
        if self.isSet(self.handleInvalid):
            return spec.check_invalid_policy(self.getOrDefault(self.handleInvalid))
        return spec.invalid_policy

    def _transform(self, dataset: DataFrame) -> DataFrame:
        spark = dataset.sparkSession
        shipped = self._shipped.get(spark)
        if shipped is None:
            shipped = self._shipped[spark] = ship(spark, self.local_model())
        columns = SparkMLColumns(
            prediction=self.getPredictionCol(),
            probability=self.getProbabilityCol(),
            raw_prediction=self.getRawPredictionCol(),
        )
        try:
            policy = self.invalid_policy()
        except ValueError as err:
            raise ScoringError(f"TorchModel: {err}") from None
        spec = shipped.spec
        missing = [c for c in spec.input_columns if c not in dataset.columns]
        if not missing and (spec.numeric or spec.arrays):
            total, per_column = invalid_counts(dataset, spec)
            if total and policy == "error":
                raise ScoringError(
                    f"TorchModel.transform: {total:,} rows have invalid features (null, NaN or "
                    f"infinite numbers, broken arrays; rows per column: "
                    f"{invalid_summary(per_column)}) and handleInvalid is 'error' "
                    "(setHandleInvalid('keep') or 'skip' scores the rest)"
                )
            if total:
                log.warning(
                    "TorchModel.transform: %s rows have invalid features (%s): %s "
                    "(handleInvalid=%r)",
                    f"{total:,}",
                    invalid_summary(per_column),
                    POLICY_OUTCOME[policy],
                    policy,
                )
        return scored_frame(dataset, shipped, spark_ml=columns, handle_invalid=policy)

    def copy(self, extra: dict[Param, Any] | None = None) -> TorchModel:
        copied = super().copy(extra)  # a shallow copy: the files and shipped archives are shared
        copied.history = list(self.history)
        copied.metrics = dict(self.metrics)
        return copied

    def write(self) -> MLWriter:
        return _Writer(self)

    @classmethod
    def read(cls) -> MLReader:
        return _Reader()


class _Writer(MLWriter):
    """Spark ML's metadata (params, the fit's history and metrics) and the model's files, both
    written through Spark, so any path Spark writes works (local, HDFS, S3A), classic or
    Connect."""

    def __init__(self, instance: TorchModel) -> None:
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        if self.shouldOverwrite:
            from pyspark.ml.util import _remove_dfs_dir

            _remove_dfs_dir(path, self.sparkSession)
        self.saveImpl(path)

    def saveImpl(self, path: str) -> None:
        model = self.instance
        DefaultParamsWriter.saveMetadata(
            model,
            path,
            self.sparkSession,
            extraMetadata={"history": model.history, "metrics": model.metrics},
        )
        rows = []
        root = model.local_model()
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            data = file.read_bytes()
            name = file.relative_to(root).as_posix()
            for part, start in enumerate(range(0, max(len(data), 1), _CHUNK)):
                rows.append((name, part, data[start : start + _CHUNK]))
        frame = self.sparkSession.createDataFrame(rows, "file string, part int, data binary")
        frame.coalesce(1).write.parquet(f"{path.rstrip('/')}/{MODEL_FOLDER}")


class _Reader(MLReader):
    def load(self, path: str) -> TorchModel:
        spark = self.sparkSession
        metadata = DefaultParamsReader.loadMetadata(path, spark)
        model = TorchModel()
        DefaultParamsReader.getAndSetParams(model, metadata)
        model.history = metadata.get("history") or []
        model.metrics = metadata.get("metrics") or {}
        files: dict[str, list[tuple[int, bytes]]] = {}
        for row in spark.read.parquet(f"{path.rstrip('/')}/{MODEL_FOLDER}").collect():
            files.setdefault(row["file"], []).append((int(row["part"]), bytes(row["data"])))
        root = Path(tempfile.mkdtemp(dir=_DOWNLOADS))
        for name, parts in files.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"".join(data for _, data in sorted(parts)))
        model._local = root
        return model
