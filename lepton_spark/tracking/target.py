"""Where MLflow runs go: the embedded local store, or a tracking server.

The embedded default is a sqlite store with an artifact folder under ``tracking.local_store``
(``./mlruns-data``); ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` / ``tracking.tracking_uri`` point
at a server instead, in that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lepton_spark.config import TrackingConfig
from lepton_spark.errors import path_error
from lepton_spark.shards.storage import check_writable


@dataclass(frozen=True)
class TrackingTarget:
    tracking_uri: str
    artifact_root: str | None  # set for the embedded local store

    @property
    def ui_command(self) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"open {self.tracking_uri}"
        cmd = f"mlflow ui --backend-store-uri {self.tracking_uri}"
        return cmd + (
            f" --default-artifact-root {self.artifact_root}" if self.artifact_root else ""
        )


def resolve_tracking(cfg: TrackingConfig, override: str | None = None) -> TrackingTarget:
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri:
        return TrackingTarget(tracking_uri=uri, artifact_root=None)
    store = Path(cfg.local_store).resolve()
    check_writable(store, "tracking.local_store")  # tried, then made for real below
    try:
        store.mkdir(parents=True, exist_ok=True, mode=0o700)  # runs and models: the user's
    except OSError as err:
        raise path_error(err, "tracking.local_store", store) from None
    return TrackingTarget(
        tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        artifact_root=(store / "artifacts").as_uri(),
    )
