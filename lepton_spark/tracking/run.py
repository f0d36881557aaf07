"""One MLflow run's lifecycle, owned by the driver: opened, written to, and closed as FINISHED,
FAILED (with the error as a tag) or KILLED.

Metrics can go through MLflow's asynchronous logger (queued, sent in batches), params and tags
are redacted (:mod:`lepton_spark.redact`), and mlflow's tracking URI is put back on exit so that
the next run in the same process (a notebook's) resolves its own target again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from lepton_spark.names import TAG_ERROR, TAG_RUN_KEY
from lepton_spark.redact import redact_mapping, redact_text
from lepton_spark.tracking.target import TrackingTarget

log = logging.getLogger(__name__)

_PARAM_VALUE_LIMIT = 6000
ASYNC_BUFFER_ENV = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"
_BATCH = 100


def find_keyed_run(target: TrackingTarget, experiment: str, run_key: str) -> Any | None:
    """The latest run of ``experiment`` tagged with ``run_key`` (``None``: there is none)."""
    client = MlflowClient(target.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_RUN_KEY}` = '{run_key}'",  # keys are checked: no quotes
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def ended_status(client: MlflowClient, run_id: str, error: BaseException | None) -> str:
    """The status a run ends with: FINISHED, KILLED (an interrupt) or FAILED, the error then
    recorded as its ``error`` tag (redacted; never a reason not to close the run)."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    try:
        text = redact_text(f"{type(error).__name__}: {error}")[:5000]
        client.set_tag(run_id, TAG_ERROR, text)
    except Exception:  # the run must still be closed
        log.exception("could not record the error on run %s", run_id)
    return RunStatus.to_string(RunStatus.FAILED)


class TrackedRun:
    """One MLflow run, owned by the driver. Use as a context manager."""

    def __init__(
        self,
        target: TrackingTarget,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        resume_run_id: str | None = None,
        system_metrics_interval_s: float | None = None,
    ) -> None:
        self.target = target
        self.system_metrics_interval_s = system_metrics_interval_s
        self.resume_run_id = resume_run_id
        self.experiment = experiment
        self.run_name = run_name
        self.tags = tags or {}
        self.client = MlflowClient(target.tracking_uri)
        self.run_id = ""
        self._previous_uri: tuple[str | None, str | None] = (None, None)

    def __enter__(self) -> TrackedRun:
        # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI; both are put back on exit, so
        # the next run in this process (a notebook's) resolves its own target again.
        self._previous_uri = (
            mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None,
            os.environ.get("MLFLOW_TRACKING_URI"),
        )
        mlflow.set_tracking_uri(self.target.tracking_uri)
        # MLflow's async logger writes each queued call on its own unless told to gather them:
        # per-step metrics written one by one cost a 2-core machine ~10% of training time
        # (benchmarks/tracking.py); gathered for 2 s they cost nothing measurable. A user's own
        # setting wins.
        os.environ.setdefault(ASYNC_BUFFER_ENV, "2")
        exp = experiment_id(self.client, self.experiment, self.target.artifact_root)
        # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) sampled on
        # the driver's host, logged as system/* metrics while the run is live.
        system = self.system_metrics_interval_s is not None
        if system:
            mlflow.set_system_metrics_sampling_interval(self.system_metrics_interval_s)
            mlflow.set_system_metrics_samples_before_logging(1)
        if self.resume_run_id:  # the same run again: RUNNING, its params and metrics kept
            run = mlflow.start_run(
                run_id=self.resume_run_id, tags=self.tags, log_system_metrics=system
            )
        else:
            run = mlflow.start_run(
                experiment_id=exp,
                run_name=self.run_name,
                tags=self.tags,
                log_system_metrics=system,
            )
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            status = RunStatus.to_string(RunStatus.FINISHED)
            if self.resume_run_id:  # an earlier attempt's error no longer describes the run
                with contextlib.suppress(Exception):
                    self.client.delete_tag(self.run_id, TAG_ERROR)
        else:
            status = ended_status(self.client, self.run_id, exc)
        try:
            self.flush()
        except Exception:  # the run must still be closed
            log.exception("could not write the last metrics of run %s", self.run_id)
        try:
            mlflow.end_run(status=status)
        finally:
            self._restore_tracking_uri()

    def flush(self) -> None:
        """Wait until the metrics logged asynchronously are in the store."""
        mlflow.flush_async_logging()

    def _restore_tracking_uri(self) -> None:
        uri, env = self._previous_uri
        mlflow.set_tracking_uri(uri)  # None: back to mlflow's default resolution
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_params(self, params: dict[str, str]) -> None:
        params = redact_mapping(params)
        items = [Param(k, v[:_PARAM_VALUE_LIMIT]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        tags = redact_mapping(tags)
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int, wait: bool = True) -> None:
        """``wait=False``: queued and sent in batches by MLflow's async logger (metrics as
        training goes: the caller, a rank's event, never waits for the store)."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=wait)

    def log_image(self, png: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory(prefix="lepton-artifact-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(png)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True), artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
