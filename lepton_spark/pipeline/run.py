"""The main job: config → Spark ETL → Arrow shards → barrier training → MLflow.

``run_pipeline(config)`` is what ``lepton-spark run`` calls; notebooks and jobs call it (or its
steps, :mod:`lepton_spark.pipeline.steps`) the same way. It reads as its steps: resolve the run
key, open the run, materialize the shards, train with retries, publish the model, finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lepton_spark.cluster.slots import check_slots
from lepton_spark.config import PipelineConfig, load_config
from lepton_spark.data.session import spark_session
from lepton_spark.events import Event
from lepton_spark.names import TAG_CONFIG_HASH, TAG_PARENT_RUN, TAG_RUN_KEY
from lepton_spark.pipeline import steps
from lepton_spark.pipeline.console import ConsoleProgress
from lepton_spark.pipeline.runkey import Previous, check_run_key, previous_run, read_finished
from lepton_spark.redact import redact_tree
from lepton_spark.shards.lease import lease
from lepton_spark.sparkinfo import Session, master_of
from lepton_spark.tracking import artifacts
from lepton_spark.tracking.run import TrackedRun
from lepton_spark.tracking.tags import pipeline_tags
from lepton_spark.tracking.target import TrackingTarget, resolve_tracking
from lepton_spark.training.checkpoint import CHECKPOINT_NAME, SHARDED_PREFIX

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_id: str
    experiment: str
    tracking_uri: str
    ui_command: str
    model_uri: str
    shard_folder: str
    shards_reused: bool
    metrics: dict[str, float]  # the last epoch's, named as in lepton_spark.names (val/accuracy)
    history: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outcome: Literal["trained", "resumed", "already_finished"] = "trained"
    run_key: str | None = None
    registered_version: str | None = None  # with tracking.registered_model: alias "candidate"
    baseline: dict[str, float] = field(default_factory=dict)  # baseline.mllib: mllib/* metrics


SparkArg = Session | Callable[[], Session] | None  # classic or Spark Connect


def run_pipeline(
    config: PipelineConfig | str | Path,
    *,
    spark: SparkArg = None,
    tracking_uri: str | None = None,
    progress: Callable[[Event], None] | None = None,
    rebuild_shards: bool = False,
    run_key: str | None = None,
    force: bool = False,
    parent_run_id: str | None = None,
) -> PipelineResult:
    """Run the whole pipeline and return where everything went.

    ``spark``: an existing session (a notebook's; classic or Spark Connect), or a function that
    makes one when it is needed (spark-submit's); otherwise one is made from ``config.spark``.
    ``progress``: receives rank events; by default they are shown on the console.
    ``rebuild_shards``: write the shards again even if committed ones match the fingerprint.
    ``run_key`` (a scheduled run's date, say) makes the call idempotent: a finished run with the
    same key is returned as it is (``outcome="already_finished"``, no Spark, no training); an
    unfinished one (failed, killed) is resumed, the same MLflow run, from its last checkpoint;
    ``force`` starts a fresh run whatever exists. ``parent_run_id``: nest the run under that
    MLflow run (a parameter search's parent).
    """
    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    check_run_key(run_key)
    target = resolve_tracking(cfg.tracking, tracking_uri)
    steps.check_folders(cfg)
    experiment = cfg.tracking.experiment or cfg.name
    tags = pipeline_tags(cfg) | ({TAG_RUN_KEY: run_key} if run_key else {})
    if parent_run_id:
        tags[TAG_PARENT_RUN] = parent_run_id
    previous = previous_run(target, experiment, run_key, tags[TAG_CONFIG_HASH], force)
    if previous is not None and previous.finished:
        return _already_finished(previous, target, experiment)
    timings: dict[str, float] = {}
    with _open_run(cfg, target, experiment, tags, previous, run_key) as run:
        session = _session(cfg, spark)
        shard_set, warnings = _shards(session, cfg, run, rebuild_shards, previous, timings)
        with lease(shard_set.folder):  # no other run's commit or gc removes them meanwhile
            with steps.timed(timings, "training"), _shown(progress) as show:
                chief, attempts = steps.train(session, cfg, run, shard_set, show)
            published = steps.publish_model(session, cfg, run, shard_set, chief, timings)
            baseline = _baseline(session, cfg, run, shard_set, timings)
        _finish(run, cfg, timings)
    if attempts > 1:
        warnings.append(f"training needed {attempts} attempts; it resumed from checkpoints")
    return PipelineResult(
        run_id=run.run_id,
        experiment=experiment,
        tracking_uri=target.tracking_uri,
        ui_command=target.ui_command,
        model_uri=published.model_uri,
        shard_folder=shard_set.folder,
        shards_reused=shard_set.reused,
        metrics=chief.final_metrics,
        history=chief.history,
        timings=timings,
        rows={name: s.rows for name, s in shard_set.manifest.splits.items()},
        warnings=warnings,
        outcome="resumed" if previous is not None else "trained",
        run_key=run_key,
        registered_version=published.version,
        baseline=baseline,
    )


@contextmanager
def _open_run(
    cfg: PipelineConfig,
    target: TrackingTarget,
    experiment: str,
    tags: dict[str, str],
    previous: Previous | None,
    run_key: str | None,
) -> Iterator[TrackedRun]:
    """A new MLflow run named after the pipeline and the run key (or the start time), or the
    unfinished run ``previous`` again. A new run gets the params and the redacted config."""
    run_name = cfg.tracking.run_name or f"{cfg.name}-{run_key or time.strftime('%Y%m%d-%H%M%S')}"
    with TrackedRun(
        target,
        experiment,
        run_name,
        tags,
        resume_run_id=previous.run_id if previous else None,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
    ) as run:
        if previous is None:
            run.log_params(cfg.flat())
            config = redact_tree(cfg.model_dump(mode="json"))
            run.log_text(yaml.safe_dump(config, sort_keys=False), artifacts.CONFIG_ARTIFACT)
        yield run


def _shards(
    spark: Session,
    cfg: PipelineConfig,
    run: TrackedRun,
    rebuild: bool,
    previous: Previous | None,
    timings: dict[str, float],
) -> tuple[steps.ShardSet, list[str]]:
    """Slots checked before any work, then the shards found or written, checked and reported;
    the warnings a person should see at the end."""
    check_slots(spark, cfg.train.num_workers, cfg.train.device)
    for warning in steps.shared_storage_warnings(cfg, master_of(spark)):
        log.warning(warning)
    shard_set = steps.materialize_shards(spark, cfg, rebuild=rebuild, timings=timings)
    if previous is not None:
        previous.check_data(shard_set.manifest.fingerprint)
    steps.check_trainable(cfg, shard_set)
    return shard_set, steps.log_shards(run, cfg, shard_set)


@contextmanager
def _shown(progress: Callable[[Event], None] | None) -> Iterator[Callable[[Event], None]]:
    """``progress``, or rank events on the console (closed when training is over)."""
    if progress is not None:
        yield progress
        return
    console = ConsoleProgress()
    try:
        yield console
    finally:
        console.close()


def _baseline(
    spark: Session,
    cfg: PipelineConfig,
    run: TrackedRun,
    shard_set: steps.ShardSet,
    timings: dict[str, float],
) -> dict[str, float]:
    if not cfg.baseline.mllib:
        return {}
    with steps.timed(timings, "baseline"):
        return steps.run_baseline(spark, cfg, run, shard_set.manifest)


def _finish(run: TrackedRun, cfg: PipelineConfig, timings: dict[str, float]) -> None:
    """The stage timings into the run; the last checkpoint becomes the run's ``checkpoint/``
    artifact and its folder goes (training is over; MLflow holds the copy)."""
    artifacts.log_timings(run, timings)
    folder = steps.checkpoint_folder(cfg, run)
    # FSDP's record names a sharded folder beside it: that goes too, or the record holds nothing.
    sharded = [folder.child(n) for n in folder.subfolders() if n.startswith(SHARDED_PREFIX)]
    artifacts.keep_checkpoint(run, folder.child(CHECKPOINT_NAME), sharded)
    folder.delete_folder()


def _session(cfg: PipelineConfig, spark: SparkArg) -> Session:
    """The given session (classic or Connect), the one a factory makes, or one from the config."""
    if spark is None:
        return spark_session(cfg.spark, app_name=f"lepton-spark {cfg.name}")
    return spark() if callable(spark) and not hasattr(spark, "sql") else spark


def _already_finished(
    previous: Previous, target: TrackingTarget, experiment: str
) -> PipelineResult:
    """What a finished run of the same key produced, read back from MLflow (no new training)."""
    finished = read_finished(previous)
    return PipelineResult(
        run_id=previous.run_id,
        experiment=experiment,
        tracking_uri=target.tracking_uri,
        ui_command=target.ui_command,
        model_uri=finished.model_uri,
        shard_folder=finished.shard_folder,
        shards_reused=True,
        metrics=finished.metrics,
        history=[],
        rows=finished.rows,
        warnings=finished.warnings,
        outcome="already_finished",
        run_key=previous.run_key,
    )
