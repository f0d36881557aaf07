"""The steps of the main job, each a function a test (or a notebook) can call on its own.

:func:`lepton_spark.pipeline.run.run_pipeline` calls them in this order: the shards
(:func:`materialize_shards`, checked by :func:`check_trainable`, reported by :func:`log_shards`),
the training stage (:func:`train`), the model (:func:`publish_model`), the MLlib baseline
(:func:`run_baseline`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lepton_spark import baselines
from lepton_spark.cluster.attempts import run_attempts
from lepton_spark.cluster.stage import BarrierSettings
from lepton_spark.cluster.task import RankContext
from lepton_spark.config import PipelineConfig
from lepton_spark.data.fingerprint import dataset_fingerprint
from lepton_spark.data.prepare import prepare
from lepton_spark.data.sources import raw_example
from lepton_spark.errors import (
    DataError,
    ShardError,
)
from lepton_spark.events import Event
from lepton_spark.models import trained_network
from lepton_spark.names import (
    INPUT_VIEW_PREFIX,
    TAG_ATTEMPTS,
    TAG_COMPRESSED_MODEL_URI,
    TAG_COMPRESSION,
    TAG_MODEL_URI,
    TAG_REGISTRY_COMPRESSED_VERSION,
    TAG_REGISTRY_MODEL,
    TAG_REGISTRY_VERSION,
    TAG_TRANSFORMERS_MODEL_URI,
    VAL_ACCURACY,
)
from lepton_spark.redact import redact_text
from lepton_spark.serving import compression, pyfunc
from lepton_spark.shards import gc
from lepton_spark.shards.commit import find_committed
from lepton_spark.shards.loader import Layout, read_split
from lepton_spark.shards.manifest import Manifest, SkewReport
from lepton_spark.shards.storage import Location, check_writable, locate
from lepton_spark.shards.writer import ShardSet, write_shards
from lepton_spark.sparkinfo import Session
from lepton_spark.tracking import artifacts
from lepton_spark.tracking.live import LiveMetrics
from lepton_spark.tracking.registry import register, register_variant
from lepton_spark.tracking.run import TrackedRun
from lepton_spark.training.job import TrainResult, TrainSpec
from lepton_spark.training.worker import train_rank

log = logging.getLogger(__name__)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Seconds spent in the block, as ``timings[stage]`` (the run's ``time/<stage>_s``)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - started, 2)


# -- shards ----------------------------------------------------------------------------------------


def shard_folder_name(cfg: PipelineConfig, fingerprint: str) -> str:
    """Same data, features, split and sharding → the same folder (per number of ranks)."""
    return f"{cfg.name}-{fingerprint[:16]}-w{cfg.train.num_workers}"


def check_folders(cfg: PipelineConfig) -> None:
    """Before anything is written: the local folders the run writes to (``shards.root``,
    ``train.checkpoint_root``) can be made and written; otherwise a
    :class:`~lepton_spark.errors.PathError` naming the field and the path."""
    for field, where in (
        ("shards.root", cfg.shards.root),
        ("train.checkpoint_root", cfg.train.checkpoint_root),
    ):
        place = locate(where)
        if place.is_local:
            check_writable(Path(place.path), field)


def materialize_shards(
    spark: Session,
    cfg: PipelineConfig,
    *,
    rebuild: bool = False,
    timings: dict[str, float] | None = None,
) -> ShardSet:
    """The pipeline's committed shards: found by the dataset fingerprint, or written now.

    ``rebuild`` writes them again even when a committed folder with the same fingerprint exists.
    ``timings`` receives the seconds spent on ``etl`` and ``shards``.
    """
    timings = {} if timings is None else timings
    with timed(timings, "etl"):
        fingerprint, source = dataset_fingerprint(spark, cfg)
        folder = locate(cfg.shards.root).child(shard_folder_name(cfg, fingerprint))
        manifest, why = (None, "--rebuild-shards") if rebuild else find_committed(folder)
        if manifest is None:
            log.info("%s: writing the shards", redact_text(why))
            prepared = prepare(spark, cfg)
    if manifest is not None:
        log.info(
            "reusing the shards at %s (same dataset fingerprint, written %s); "
            "--rebuild-shards writes them again",
            redact_text(folder.uri),
            manifest.created_at,
        )
        timings["shards"] = 0.0
        gc.touch(folder)
        return ShardSet(folder=folder.uri, manifest=manifest, reused=True)
    with timed(timings, "shards"):
        try:
            val_rows = round(prepared.rows * cfg.split.validation_fraction)
            written = write_shards(
                {"train": prepared.train, "validation": prepared.validation},
                prepared.feature_spec,
                folder,
                cfg.shards,
                num_workers=cfg.train.num_workers,
                estimated_rows={"train": prepared.rows - val_rows, "validation": val_rows},
                fingerprint=fingerprint,
                source={**source, "quality": prepared.quality},
            )
        finally:
            prepared.release()
    try:
        gc.collect(
            cfg.shards.root, cfg.name, cfg.shards.keep, protect=(folder.path.rsplit("/", 1)[-1],)
        )
    except (OSError, ShardError) as err:  # housekeeping never fails the run it follows
        log.warning("shards gc under %s failed: %s", redact_text(cfg.shards.root), err)
    return written


def check_trainable(cfg: PipelineConfig, shard_set: ShardSet) -> None:
    """Enough training rows for every rank to run at least one full step (before submitting).

    Shards written for nothing (this run wrote them and cannot train on them) are removed.
    """
    t = cfg.train
    batch = 1 if cfg.features.task == "clustering" else t.batch_size  # k-means takes no steps
    problem = shard_set.manifest.split("train").training_problem(t.num_workers, batch, t.tail)
    if problem:
        if not shard_set.reused:
            locate(shard_set.folder).delete_folder()
        raise DataError(problem)


def shared_storage_warnings(cfg: PipelineConfig, master: str) -> list[str]:
    """Local shard or checkpoint paths with a cluster master: fine on one host, not on many."""
    if master.startswith("local"):
        return []
    return [
        f"{field} is the local path {place.path}: on a cluster of several hosts every executor "
        "must see it (a shared mount, or a URI such as s3://…, hdfs://…)"
        for field, place in (
            ("shards.root", locate(cfg.shards.root)),
            ("train.checkpoint_root", locate(cfg.train.checkpoint_root)),
        )
        if place.is_local
    ]


def skew_warnings(cfg: PipelineConfig, reports: dict[str, SkewReport]) -> list[str]:
    """A warning when a rank gets more than ``shards.skew_warning`` × the mean training rows.

    (Validation skew costs nothing: evaluation has no steps to keep equal.)
    """
    return [
        f"{split}: rank rows are skewed, max/mean {r.rank_max_over_mean:.2f} "
        f"(rows per rank {r.rows_per_rank}); ranks with fewer rows "
        + (
            "wrap around to keep steps equal (train.tail: pad)"
            if cfg.train.tail == "pad"
            else "set the steps and larger ranks leave rows out each epoch (train.tail: drop)"
        )
        for split, r in reports.items()
        if split == "train" and r.rank_max_over_mean > cfg.shards.skew_warning
    ]


def dataset_source(cfg: PipelineConfig, manifest: Manifest | None = None) -> dict[str, str]:
    """Where the training data comes from, as MLflow's Spark dataset source says it: the path or
    the table of a single source, else the SQL transform (or what is generated).

    A ``TorchEstimator``'s DataFrame (a temporary view under a name of ours, which means nothing
    to a reader) is told by the folders of the files it reads (from the ``manifest``'s summary),
    or else by its query plan's hash.
    """
    if cfg.transform is None and len(cfg.sources) == 1:
        name, source = next(iter(cfg.sources.items()))
        if source.path is not None:
            return {"path": redact_text(source.path)}
        if source.table is not None and source.table.startswith(INPUT_VIEW_PREFIX):
            state = (manifest.source.get("sources") or {}).get(name, {}) if manifest else {}
            if state.get("folders"):
                return {"path": redact_text(",".join(state["folders"]))}
            return {"sql": f"a DataFrame (TorchEstimator.fit; plan {state.get('plan', '?')})"}
        if source.table is not None:
            return {"table_name": source.table}
        if source.generate is not None:
            g = source.generate
            return {"sql": f"generated {g.kind} (rows={g.rows}, seed={g.seed})"}
    return {"sql": cfg.transform or ""}


def log_shards(run: TrackedRun, cfg: PipelineConfig, shard_set: ShardSet) -> list[str]:
    """The shards' manifest, skew and data quality into the run, the dataset as its MLflow
    input; the skew warnings."""
    manifest = shard_set.manifest
    artifacts.log_dataset(
        run, cfg.name, dataset_source(cfg, manifest), manifest.fingerprint, manifest.feature_spec
    )
    skew = {name: s.skew(cfg.train.num_workers) for name, s in manifest.splits.items()}
    artifacts.log_shards(
        run, manifest, shard_set.folder, shard_set.reused, skew, cfg.train.num_workers
    )
    warnings = skew_warnings(cfg, skew)
    for warning in warnings:
        log.warning(warning)
    return warnings


# -- the training stage ----------------------------------------------------------------------------


def train_with_retries(
    spark: Session,
    spec: TrainSpec,
    on_event: Callable[[Event], None],
    events_host: str | None = None,
) -> tuple[list[TrainResult], int]:
    """Run the training stage; when a rank fails, run it again (``train.retries`` times,
    elastic down to ``train.min_workers``: :func:`~lepton_spark.cluster.attempts.run_attempts`).

    Each new attempt resumes from the last checkpoint rank 0 wrote, not from step 0. Returns the
    ranks' results and how many attempts it took.
    """
    settings = BarrierSettings(
        gloo_timeout_s=spec.train.gloo_timeout_s,
        stall_timeout_s=spec.train.stall_timeout_s,  # train_rank sends heartbeats: watched
        events_host=events_host,
        engine=spec.train.backend,
        warm_ranks=spec.train.warm_ranks,
    )

    def attempt_of(attempt: int, ranks: int) -> Callable[[RankContext], TrainResult]:
        train = spec.train.model_copy(update={"num_workers": ranks})
        return functools.partial(
            train_rank, dataclasses.replace(spec, train=train, attempt=attempt)
        )

    return run_attempts(
        spark,
        attempt_of,
        num_workers=spec.train.num_workers,
        retries=spec.train.retries,
        min_workers=spec.train.min_workers,
        settings=settings,
        device=spec.train.device,
        on_event=on_event,
    )


def train(
    spark: Session,
    cfg: PipelineConfig,
    run: TrackedRun,
    shard_set: ShardSet,
    show: Callable[[Event], None],
) -> tuple[TrainResult, int]:
    """The barrier stage on the run's shards, its events shown and logged live; rank 0's
    result and the attempts it took. Checkpoints go to ``train.checkpoint_root/<run id>``."""
    spec = TrainSpec(
        shard_folder=str(shard_set.folder),
        train=cfg.train,
        model=cfg.model,
        checkpoint_dir=checkpoint_folder(cfg, run).uri,
    )
    live = LiveMetrics(run)

    def on_event(event: Event) -> None:
        live(event)
        show(event)

    results, attempts = train_with_retries(spark, spec, on_event, cfg.spark.events_host)
    run.set_tags({TAG_ATTEMPTS: attempts})
    missed = live.replay(results[0].reports)
    if missed:
        log.warning(
            "%d of rank 0's reports never reached this driver while training ran (no route "
            "from the executors to its event channel, or a connection it refused); logged to "
            "MLflow now",
            missed,
        )
    return results[0], attempts


def checkpoint_folder(cfg: PipelineConfig, run: TrackedRun) -> Location:
    """Where the run's checkpoints go: one folder per MLflow run (a resumed run finds its own)."""
    return locate(cfg.train.checkpoint_root).child(run.run_id)


# -- after training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    model_uri: str
    version: str | None  # with tracking.registered_model: the version marked "candidate"


def publish_model(
    spark: Session,
    cfg: PipelineConfig,
    run: TrackedRun,
    shard_set: ShardSet,
    chief: TrainResult,
    timings: dict[str, float],
) -> Published:
    """The trained network into the run: pictures, the served model (raw columns in), the
    registry's new candidate, the compressed variant, the history."""
    spec = shard_set.manifest.feature_spec
    network = trained_network(cfg.model, spec, chief.load_state_dict())
    residuals = _residuals(network, shard_set) if spec.task == "regression" else None
    artifacts.log_pictures(run, chief.history, chief.steps_per_epoch, chief.confusion, residuals)
    example = raw_example(spark, cfg)
    requirements = pyfunc.pip_requirements(cfg.model)
    with timed(timings, "model_logging"):
        model_uri = pyfunc.log_model(
            network, cfg.model, spec, example, pip_requirements=requirements
        )
        if cfg.model.name == "hf":  # also as MLflow's transformers flavor, where it can be
            try:
                flavor = pyfunc.log_transformers_model(network)
                run.set_tags({TAG_TRANSFORMERS_MODEL_URI: flavor})
            except Exception as err:  # MLflow's flavor failing must not lose the pyfunc model
                log.warning("the transformers flavor was not logged (%s); the pyfunc model is", err)
    run.set_tags({TAG_MODEL_URI: model_uri})
    version = None
    if cfg.tracking.registered_model:
        version = register(model_uri, cfg.tracking.registered_model)
        run.set_tags(
            {TAG_REGISTRY_MODEL: cfg.tracking.registered_model, TAG_REGISTRY_VERSION: version}
        )
    if cfg.compress.enabled:
        with timed(timings, "compression"):
            _publish_compressed(run, cfg, shard_set, network, example, version)
    run.log_json(chief.history, artifacts.HISTORY_ARTIFACT)
    if spec.task == "clustering":  # the final centroids' costs, beside the per-iteration ones
        run.log_metrics(chief.final_metrics, step=int(chief.history[-1]["epoch"]))
    return Published(model_uri, version)


def validation_batches(shard_set: ShardSet) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
    """The validation split as ``(model inputs, labels)`` batches (on the driver)."""
    layout = Layout.of(shard_set.manifest.feature_spec)
    for batch in read_split(shard_set.folder, shard_set.manifest, "validation"):
        yield layout.inputs(batch), batch.label.numpy()


def _residuals(network: torch.nn.Module, shard_set: ShardSet) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and actual values of the validation split (regression; on the driver)."""
    predicted, actual = [], []
    with torch.inference_mode():
        for inputs, labels in validation_batches(shard_set):
            predicted.append(network(inputs)[:, 0].float().numpy())
            actual.append(labels)
    if not predicted:
        return np.empty(0), np.empty(0)
    return np.concatenate(predicted), np.concatenate(actual)


def _publish_compressed(
    run: TrackedRun,
    cfg: PipelineConfig,
    shard_set: ShardSet,
    network: torch.nn.Module,
    example: pd.DataFrame,
    trained_version: str | None,
) -> None:
    """Compress the trained network (``cfg.compress``), measure both, log the compressed one as
    the run's ``model_compressed`` and, with a registered model, as a version of its own."""
    compressed = compression.compress(network, cfg.compress)
    report = compression.measure(network, compressed, validation_batches(shard_set), cfg.compress)
    log.info("compression %s", report.summary())
    artifacts.log_compression(run, report)
    uri = pyfunc.log_model(
        compressed,
        cfg.model,
        shard_set.manifest.feature_spec,
        example,
        pip_requirements=pyfunc.pip_requirements(),
        name="model_compressed",
    )
    tags = {TAG_COMPRESSION: report.method, TAG_COMPRESSED_MODEL_URI: uri}
    if cfg.tracking.registered_model:
        version = register_variant(
            uri,
            cfg.tracking.registered_model,
            report.method,
            {VAL_ACCURACY: report.after.accuracy},
            trained_version,
        )
        tags[TAG_REGISTRY_COMPRESSED_VERSION] = version
    run.set_tags(tags)


def run_baseline(
    spark: Session, cfg: PipelineConfig, run: TrackedRun, manifest: Manifest
) -> dict[str, float]:
    """Spark MLlib on the same split (ETL again: the split is seeded), logged as ``mllib/*``:
    logistic regression, linear regression or k-means by the task."""
    prepared = prepare(spark, cfg)
    try:
        if prepared.rows != sum(s.rows for s in manifest.splits.values()):
            log.warning("the baseline's rows differ from the shards' (the source changed?)")
        result = baselines.for_pipeline(
            prepared.train, prepared.validation, prepared.feature_spec, cfg
        )
    finally:
        prepared.release()
    log.info(
        "Spark MLlib %s: %s (fit %.1f s)",
        result.name,
        ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()),
        result.train_seconds,
    )
    return artifacts.log_baseline(run, result.name, result.metrics, result.train_seconds)
