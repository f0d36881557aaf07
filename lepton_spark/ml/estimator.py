"""``TorchEstimator``: a ``pyspark.ml`` Estimator that trains on a DataFrame through the pipeline.

``fit(df)`` runs exactly what ``run_pipeline`` runs (one code path): the DataFrame becomes the
pipeline's one source (a temporary view, fingerprinted by its query plan and input files, so
fitting the same DataFrame twice reuses its shards), features and label are encoded on Spark, the
split is seeded, the shards are written, the ranks train in one barrier stage, and the MLflow run
gets everything a pipeline's run gets. It returns a :class:`~lepton_spark.ml.model.TorchModel`.
Works on classic Spark and on Spark Connect (whatever session the DataFrame belongs to), as a
stage of a ``Pipeline`` and under ``TrainValidationSplit`` / ``CrossValidator``: each candidate is
an MLflow run of its own, nested under one parent run per search.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import ValidationError
from pyspark.ml import Estimator
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasWeightCol,
)
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame

from lepton_spark.config import PipelineConfig
from lepton_spark.data.columns import check_columns
from lepton_spark.data.fingerprint import plan_identity
from lepton_spark.errors import ConfigError, DataError
from lepton_spark.events import Event
from lepton_spark.ml.model import TorchModel
from lepton_spark.ml.params import FIELDS, ConfigParams, param_of
from lepton_spark.names import INPUT_VIEW_PREFIX, TAG_PIPELINE, TAG_SEARCH

log = logging.getLogger(__name__)


class TorchEstimator(
    ConfigParams,
    HasFeaturesCol,
    HasLabelCol,
    HasWeightCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    Estimator,
    DefaultParamsReadable,
    DefaultParamsWritable,
):
    """Train a PyTorch model on a DataFrame with lepton-spark; see the module docstring.

    Parameters
    ----------
    featuresCol
        A Spark ML vector (or fixed-length numeric array) column, e.g. ``VectorAssembler``'s
        output: one array feature. Used when it is set, or when no other feature column is.
    labelCol, weightCol
        The target (not for ``task="clustering"``) and an optional sample weight.
    numeric, categorical, arrays, text, task, ...
        Every field of the pipeline config's ``features``, ``split``, ``shards``, ``train``,
        ``model`` and ``tracking`` sections, by name (see :mod:`lepton_spark.ml.params` and
        ``docs/config-reference.md``): ``epochs=3, lr=0.01, model="mlp", hidden=[64]``...
    name
        The pipeline name: the MLflow experiment and the shard folder prefix.
    rebuild_shards
        Write the shards again even when committed ones match the DataFrame's fingerprint.

    Examples
    --------
    >>> est = TorchEstimator(numeric=["a", "b"], categorical=["city"], labelCol="y", epochs=2)
    >>> model = est.fit(df)                     # doctest: +SKIP
    >>> model.transform(df).select("prediction", "probability")  # doctest: +SKIP
    """

    name: Param[str] = Param(
        Params._dummy(),
        "name",
        "the pipeline's name: MLflow experiment and shard folder prefix",
        typeConverter=TypeConverters.toString,
    )
    rebuild_shards: Param[bool] = Param(
        Params._dummy(),
        "rebuild_shards",
        "write the shards again even when committed ones match the DataFrame's fingerprint",
        typeConverter=TypeConverters.toBoolean,
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._setDefault(name="torch-estimator", rebuild_shards=False)
        self._progress: Callable[[Event], None] | None = None
        self._parent_run_id: str | None = None
        unknown = sorted(set(kwargs) - {p.name for p in self.params})
        if unknown:
            raise TypeError(
                f"TorchEstimator has no param {unknown[0]!r} (its params are the pipeline "
                f"config's fields: {', '.join(sorted(FIELDS)[:8])}, ...; see explainParams())"
            )
        self._set(**kwargs)

    def setParams(self, **kwargs: Any) -> TorchEstimator:
        """Set any params by name (``est.setParams(lr=0.01, epochs=5)``)."""
        return self._set(**kwargs)

    def with_progress(self, progress: Callable[[Event], None] | None) -> TorchEstimator:
        """Send the ranks' events to ``progress`` instead of the console (a notebook's widget)."""
        self._progress = progress
        return self

    # -- the config a fit runs ---------------------------------------------------------------------

    def pipeline_config(self, view: str) -> PipelineConfig:
        """The pipeline config these params describe, with the temporary view ``view`` as its
        one source; a :class:`ConfigError` names the param at fault."""
        sections = self.config_sections()
        features = sections["features"]
        task = features["task"]
        if task != "clustering":
            features["label"] = self.getLabelCol()
        if self.isDefined(self.weightCol) and self.getOrDefault(self.weightCol):
            features["weight"] = self.getWeightCol()
        named = features["numeric"] or features["categorical"] or features["text"]
        if self.isSet(self.featuresCol) or not (named or features["arrays"]):
            arrays = [a for a in features["arrays"] if a["name"] != self.getFeaturesCol()]
            features["arrays"] = [{"name": self.getFeaturesCol(), "shape": None}, *arrays]
        data = {
            "name": self.getOrDefault(self.name),
            "sources": {"input": {"table": view}},
            **{s: v for s, v in sections.items() if s != "spark"},
            "spark": {"events_host": sections["spark"]["events_host"]},
        }
        try:
            return PipelineConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_param_errors(err)) from None

    # -- fit -------------------------------------------------------------------------------------

    def _fit(self, dataset: DataFrame) -> TorchModel:
        from lepton_spark.pipeline.run import run_pipeline

        cfg = self.checked_config(dataset)
        result = run_pipeline(
            cfg,
            spark=dataset.sparkSession,
            progress=self._progress,
            rebuild_shards=bool(self.getOrDefault(self.rebuild_shards)),
            parent_run_id=self._parent_run_id,
        )
        model = TorchModel(
            modelUri=result.model_uri,
            runId=result.run_id,
            trackingUri=result.tracking_uri,
            predictionCol=self.getPredictionCol(),
            probabilityCol=self.getProbabilityCol(),
            rawPredictionCol=self.getRawPredictionCol(),
        )
        model.history = result.history
        model.metrics = result.metrics
        return model

    def checked_config(self, dataset: DataFrame) -> PipelineConfig:
        """The config of a fit on ``dataset``, once the params and the DataFrame's columns are
        known to do: before any MLflow run or shard, a bad param or column names itself."""
        _check_input(dataset)
        cfg = self.pipeline_config(input_view(dataset))
        check_columns(dataset, cfg.features)
        return cfg

    def fitMultiple(
        self, dataset: DataFrame, paramMaps: Sequence[dict[Param, Any]]
    ) -> Iterator[tuple[int, TorchModel]]:
        """One model per param map (``TrainValidationSplit``, ``CrossValidator``): each an
        MLflow run nested under one parent run for the search. Fitted one at a time, whatever
        the search's ``parallelism``: every fit needs all the cluster's training slots."""
        return _Search(self, dataset, list(paramMaps))


class _Search:
    """The iterator ``fitMultiple`` returns: thread-safe, one fit at a time, under a parent run.

    The parent is created with the first candidate (once its params and the DataFrame are known
    to do) and marked FINISHED after every candidate (its end time moves on), FAILED when one
    fails; after a failure no other candidate starts. So it is never left RUNNING, whatever the
    search does between candidates (its evaluations run outside this iterator).
    """

    def __init__(self, estimator: TorchEstimator, dataset: DataFrame, maps: list[dict]) -> None:
        self.estimator = estimator
        self.dataset = dataset
        self.maps = maps
        self.index = 0
        self.lock = threading.Lock()
        self.parent: tuple[Any, str] | None = None  # (client, run id)
        self.failed: BaseException | None = None

    def __iter__(self) -> _Search:
        return self

    def __next__(self) -> tuple[int, TorchModel]:
        with self.lock:
            if self.failed is not None:
                raise RuntimeError(f"the search stopped: a candidate failed ({self.failed})")
            if self.index >= len(self.maps):
                raise StopIteration
            index = self.index
            self.index += 1
            candidate = self.estimator.copy(self.maps[index])
            candidate._progress = self.estimator._progress
            try:
                cfg = candidate.checked_config(self.dataset)
                candidate._parent_run_id = self._parent_run(cfg)
                model = candidate._fit(self.dataset)
            except BaseException as err:
                self.failed = err
                self._end("FAILED")
                raise
            self._end("FINISHED")
            return index, model

    def _parent_run(self, cfg: PipelineConfig) -> str:
        if self.parent is None:
            from mlflow import MlflowClient

            from lepton_spark.tracking.run import experiment_id
            from lepton_spark.tracking.target import resolve_tracking

            target = resolve_tracking(cfg.tracking)
            client = MlflowClient(target.tracking_uri)
            experiment = experiment_id(
                client, cfg.tracking.experiment or cfg.name, target.artifact_root
            )
            run = client.create_run(
                experiment,
                run_name=f"{cfg.name}-search-{time.strftime('%Y%m%d-%H%M%S')}",
                tags={TAG_PIPELINE: cfg.name, TAG_SEARCH: str(len(self.maps))},
            )
            self.parent = (client, run.info.run_id)
            log.info("search over %d param maps: parent run %s", len(self.maps), run.info.run_id)
        return self.parent[1]

    def _end(self, status: str) -> None:
        if self.parent is not None:
            client, run_id = self.parent
            client.set_terminated(run_id, status)


def _check_input(dataset: DataFrame) -> None:
    if dataset.isStreaming:
        raise DataError(
            "TorchEstimator.fit takes a batch DataFrame; this one is streaming (write the "
            "stream to a table, or foreachBatch, and fit on that)"
        )


def input_view(dataset: DataFrame) -> str:
    """A temporary view of ``dataset`` under a name its query decides: the same DataFrame, the
    same view name (and the same pipeline config, and its committed shards found again)."""
    digest = hashlib.sha256(
        f"{plan_identity(dataset)}|{dataset.schema.json()}".encode()
    ).hexdigest()[:16]
    view = f"{INPUT_VIEW_PREFIX}{digest}"
    dataset.createOrReplaceTempView(view)
    return view


def _param_errors(err: ValidationError) -> str:
    """Pydantic's errors over the config, told by the estimator's param names."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(the params together)"
        if len(loc) >= 2:
            param = param_of(loc[0], loc[1])
            if loc[:2] == ["features", "label"]:
                param = "labelCol"
            elif loc[:2] == ["features", "weight"]:
                param = "weightCol"
            where = f"param {param!r} (config {'.'.join(loc)})" if param else where
        elif len(loc) == 1 and loc[0] in ("features", "model", "train"):
            where = f"params of {loc[0]}"
        lines.append(f"  {where}: {_with_param_names(e['msg'])}")
    return "TorchEstimator: invalid params\n" + "\n".join(lines)


def _with_param_names(message: str) -> str:
    """A config error's message with the config's field names told as the estimator's params."""
    for param, (section, name) in sorted(FIELDS.items(), key=lambda kv: -len(".".join(kv[1]))):
        message = message.replace(f"{section}.{name}", f"param {param!r}")
    return message
