"""The model registry: each trained model registered and marked ``candidate``; ``champion`` moved
to a version only when its validation metric beats the current champion's (the config's rule).

Works against any MLflow tracking store with a registry (the embedded sqlite store, a server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lepton_spark.names import (
    CANDIDATE,
    CHAMPION,
    COMPRESS_VAL_ACCURACY,
    VAL_ACCURACY,
    VERSION_TAG_COMPRESSED_FROM,
    VERSION_TAG_COMPRESSION,
    VERSION_TAG_METRIC_PREFIX,
    current,
    read_metric,
)

# What a compressed variant's run measured of the compressed model, by the metric it stands for.
COMPRESSED_METRICS = {VAL_ACCURACY: COMPRESS_VAL_ACCURACY}


@dataclass(frozen=True)
class Decision:
    """What ``promote`` did and why, in words a person reads in a scheduler's log."""

    promoted: bool
    version: str
    champion_before: str | None
    reason: str


def register(model_uri: str, name: str) -> str:
    """Register ``model_uri`` under ``name`` (created if new), alias it ``candidate``; its version.

    Uses mlflow's current tracking URI (inside a run, the run's store).
    """
    version = mlflow.register_model(model_uri, name).version
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    return str(version)


def register_variant(
    model_uri: str, name: str, method: str, metrics: dict[str, float], source_version: str | None
) -> str:
    """Register a derived model (a compressed copy) as a version of its own, no alias moved.

    Its run is the trained model's run, whose metrics describe the trained model: the variant's
    own metrics go on the version as ``metrics.<name>`` tags for people to read; :func:`promote`
    reads the run's own measurement of the variant (``compress/…``) instead of trusting them.
    """
    version = str(mlflow.register_model(model_uri, name).version)
    client = MlflowClient()
    client.set_model_version_tag(name, version, VERSION_TAG_COMPRESSION, method)
    if source_version is not None:
        client.set_model_version_tag(name, version, VERSION_TAG_COMPRESSED_FROM, source_version)
    for metric, value in metrics.items():
        client.set_model_version_tag(
            name, version, VERSION_TAG_METRIC_PREFIX + current(metric), repr(float(value))
        )
    return version


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _metric(client: MlflowClient, name: str, version: str, metric: str) -> float:
    """The version's ``metric``, read from its run (never from a version tag, which anyone with
    write access to the registry could set): the run's metric for a trained version; for a
    compressed variant, the run's measurement of the compressed model (``compress/…``), since
    the run's own metrics describe the uncompressed one. Under the metric's current name or,
    for runs logged before 0.2, its old one."""
    model_version = client.get_model_version(name, version)
    tags = model_version.tags or {}
    run_id = model_version.run_id
    metrics = client.get_run(run_id).data.metrics
    if VERSION_TAG_COMPRESSION in tags:
        measured = COMPRESSED_METRICS.get(current(metric))
        value = read_metric(metrics, measured) if measured else None
        if value is None:
            raise ValueError(
                f"{name} version {version} is a compressed variant "
                f"({tags[VERSION_TAG_COMPRESSION]}); {metric!r} was not measured for it (its run "
                f"measured {sorted(COMPRESSED_METRICS)} of it)"
            )
        return value
    value = read_metric(metrics, metric)
    if value is None:
        raise ValueError(
            f"{name} version {version} (run {run_id}) has no metric {metric!r}; "
            f"it has {sorted(metrics)}"
        )
    return value


def promote(
    client: MlflowClient,
    name: str,
    metric: str = VAL_ACCURACY,
    mode: Literal["max", "min"] = "max",
    version: str | None = None,
) -> Decision:
    """Move ``champion`` to ``version`` (default: the ``candidate``) if it beats the champion."""
    metric = current(metric)  # an old flat name (val_accuracy) reads as the new one
    candidate = version or _alias(client, name, CANDIDATE)
    if candidate is None:
        raise ValueError(f"registered model {name!r} has no {CANDIDATE!r} version to promote")
    value = _metric(client, name, candidate, metric)
    champion = _alias(client, name, CHAMPION)
    if champion == candidate:
        return Decision(False, candidate, champion, f"version {candidate} is the champion already")
    if champion is not None:
        best = _metric(client, name, champion, metric)
        better = value > best if mode == "max" else value < best
        if not better:
            return Decision(
                False,
                candidate,
                champion,
                f"version {candidate} {metric} {value:.4f} does not beat champion version "
                f"{champion}'s {best:.4f} ({mode}); champion stays {champion}",
            )
        reason = (
            f"version {candidate} {metric} {value:.4f} beats champion version {champion}'s "
            f"{best:.4f} ({mode})"
        )
    else:
        reason = f"no champion yet; version {candidate} {metric} {value:.4f}"
    client.set_registered_model_alias(name, CHAMPION, candidate)
    return Decision(True, candidate, champion, reason + f"; champion is now version {candidate}")
