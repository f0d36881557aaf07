"""Run keys: a scheduled run's date (say) makes ``run_pipeline`` idempotent.

A finished run with the same key is returned as it is (no Spark, no training); an unfinished one
(failed, killed) is resumed, the same MLflow run, from its last checkpoint, as long as the config
and the data are unchanged; ``force`` starts a fresh run whatever exists. Runs logged before 0.2
(flat metric names) are read the same way.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from lepton_spark.errors import InputError
from lepton_spark.names import (
    FINAL_METRICS,
    TAG_CONFIG_HASH,
    TAG_DATASET_FINGERPRINT,
    TAG_MODEL_URI,
    TAG_ROWS_PREFIX,
    TAG_SHARDS,
    read_metric,
)
from lepton_spark.tracking.run import find_keyed_run
from lepton_spark.tracking.target import TrackingTarget

log = logging.getLogger(__name__)

RUN_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")


def check_run_key(run_key: str | None) -> None:
    if run_key is not None and not RUN_KEY_PATTERN.match(run_key):
        raise InputError(
            f"--run-key {run_key!r}: use letters, digits and _ . : + - (up to 128), "
            "e.g. a date 2026-11-22"
        )


@dataclass(frozen=True)
class Previous:
    """The latest run with the same key, and what to do about it."""

    run: Any  # mlflow.entities.Run
    run_key: str
    finished: bool
    same_config: bool

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    def check_data(self, fingerprint: str) -> None:
        """An unfinished run resumes only on the data it started on (its checkpoint's)."""
        started_on = self.run.data.tags.get(TAG_DATASET_FINGERPRINT)
        if started_on not in (None, fingerprint):
            raise InputError(
                f"run key {self.run_key}: the data changed since run {self.run_id} started "
                "(dataset fingerprint differs), so its checkpoint does not apply; --force starts "
                "a fresh run"
            )


def previous_run(
    target: TrackingTarget,
    experiment: str,
    run_key: str | None,
    config_hash: str,
    force: bool,
) -> Previous | None:
    """The run this key already has (``None``: none, or ``force``). An unfinished one started
    with another config is refused: its checkpoint belongs to another model."""
    if run_key is None or force:
        return None
    run = find_keyed_run(target, experiment, run_key)
    if run is None:
        return None
    previous = Previous(
        run=run,
        run_key=run_key,
        finished=run.info.status == "FINISHED",
        same_config=run.data.tags.get(TAG_CONFIG_HASH) == config_hash,
    )
    if not previous.finished and not previous.same_config:
        raise InputError(
            f"run key {run_key}: the unfinished run {previous.run_id} was started "
            "with another pipeline config (data, features, model or training settings "
            "changed); --force starts a fresh run"
        )
    if not previous.finished:
        log.info(
            "run key %s: resuming the unfinished run %s (%s)",
            run_key,
            previous.run_id,
            run.info.status,
        )
    return previous


@dataclass(frozen=True)
class FinishedRun:
    """What a finished run produced, read back from MLflow."""

    model_uri: str
    shard_folder: str
    metrics: dict[str, float]
    rows: dict[str, int]
    warnings: list[str]


def read_finished(previous: Previous) -> FinishedRun:
    run_key = previous.run_key
    log.info("run key %s finished already in run %s", run_key, previous.run_id)
    tags, metrics = previous.run.data.tags, previous.run.data.metrics
    warnings = (
        []
        if previous.same_config
        else [
            f"the pipeline config changed since run {previous.run_id} finished for run key "
            f"{run_key}; its result stands (--force trains again)"
        ]
    )
    found = {name: read_metric(metrics, name) for name in FINAL_METRICS}
    return FinishedRun(
        model_uri=tags.get(TAG_MODEL_URI, f"runs:/{previous.run_id}/model"),
        shard_folder=tags.get(TAG_SHARDS, ""),
        metrics={k: v for k, v in found.items() if v is not None},
        rows={
            split: int(tags[TAG_ROWS_PREFIX + split])
            for split in ("train", "validation")
            if TAG_ROWS_PREFIX + split in tags
        },
        warnings=warnings,
    )
