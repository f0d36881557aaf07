"""The MLflow run of a user function (``lepton_spark.distributed.run``): its metrics, live.

The run is the caller's active run when there is one (``with mlflow.start_run(): run(fn)``, the
MLflow idiom), else a new run in ``experiment`` opened at the first metric, so a function that
logs nothing leaves no run behind. A run this class opened is closed FINISHED, FAILED (the error
as its ``error`` tag) or KILLED; the caller's own run is left open. The tracking URI is MLflow's
own (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``) when one is set, else the embedded
local store (``./mlruns-data``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from lepton_spark.config import TrackingConfig
from lepton_spark.events import Event, InvalidEvent, Metrics, decode
from lepton_spark.redact import redact_text
from lepton_spark.tracking.run import ended_status, experiment_id
from lepton_spark.tracking.target import resolve_tracking

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "lepton-spark-run"
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics


class FunctionRun:
    """An event handler: :class:`~lepton_spark.events.Metrics` → MLflow metrics. Made in the
    caller's thread (MLflow's active run is per thread); events may come on another."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None) -> None:
        active = mlflow.active_run()
        self.experiment = experiment or DEFAULT_EXPERIMENT
        self.run_name = run_name
        self.owned = active is None
        self.run_id: str | None = active.info.run_id if active is not None else None
        # MLflow's own URI when one is set; else the embedded store, made at the first metric.
        set_uri = mlflow.is_tracking_uri_set() or active is not None
        self.tracking_uri: str | None = mlflow.get_tracking_uri() if set_uri else None
        self.artifact_root: str | None = None
        self._client: MlflowClient | None = None
        self._seen: set[tuple[int, tuple[str, ...]]] = set()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Metrics):
            self._log(event)

    def _log(self, event: Metrics) -> None:
        with self._lock:
            self._seen.add(self._key(event))
            run_id = self._run()
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, event.step) for k, v in event.metrics.items()]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if self.tracking_uri is None:
                target = resolve_tracking(TrackingConfig())
                self.tracking_uri, self.artifact_root = target.tracking_uri, target.artifact_root
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @staticmethod
    def _key(event: Metrics) -> tuple[int, tuple[str, ...]]:
        return (event.step, tuple(sorted(event.metrics)))

    def _run(self) -> str:
        if self.run_id is None:
            exp = experiment_id(self.client, self.experiment, self.artifact_root)
            run = self.client.create_run(exp, run_name=self.run_name)
            self.run_id = run.info.run_id
            log.info(
                "the function's metrics go to MLflow run %s (experiment %r, %s)",
                self.run_id,
                self.experiment,
                redact_text(self.tracking_uri or ""),
            )
        return self.run_id

    def replay(self, reports: list[dict[str, Any]]) -> int:
        """Log the metrics that did not arrive live; how many events there were."""
        missed = 0
        for data in reports:
            try:
                event = decode(data)
            except InvalidEvent:
                continue
            if isinstance(event, Metrics) and self._key(event) not in self._seen:
                missed += 1
                self._log(event)
        return missed

    def close(self, error: BaseException | None = None) -> None:
        """End the run this object opened (the caller's own run stays open)."""
        if not self.owned or self.run_id is None:
            return
        status = ended_status(self.client, self.run_id, error)
        self.client.set_terminated(self.run_id, status)
