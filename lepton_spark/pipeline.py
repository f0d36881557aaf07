"""The main job: config → Spark ETL → Arrow shards → Horovod barrier training → MLflow.

``run_pipeline(config)`` is what ``lepton-spark run`` calls; notebooks and jobs call it (or its
steps) the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pyspark.sql import SparkSession

from lepton_spark import __version__, publish, serving
from lepton_spark.barrier import (
    BarrierError,
    BarrierSettings,
    SlotsError,
    check_slots,
    run_barrier,
)
from lepton_spark.checkpoint import CHECKPOINT_NAME
from lepton_spark.config import PipelineConfig, load_config
from lepton_spark.errors import InputError
from lepton_spark.etl import DataError, prepare, spark_session
from lepton_spark.fingerprint import dataset_fingerprint
from lepton_spark.manifest import Manifest, SkewReport
from lepton_spark.progress import ConsoleProgress
from lepton_spark.redact import redact_text, redact_tree
from lepton_spark.registry import register
from lepton_spark.shardio import find_committed
from lepton_spark.shards import ShardSet, write_shards
from lepton_spark.storage import Location, locate
from lepton_spark.tracking import (
    RUN_KEY_TAG,
    TrackedRun,
    TrackingTarget,
    find_keyed_run,
    resolve_tracking,
)
from lepton_spark.train import TrainResult, TrainSpec, train_rank

log = logging.getLogger(__name__)

CONFIG_HASH_TAG = "pipeline.config_hash"


@dataclass
class PipelineResult:
    run_id: str
    experiment: str
    tracking_uri: str
    ui_command: str
    model_uri: str
    shard_folder: str
    shards_reused: bool
    metrics: dict[str, float]
    history: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outcome: Literal["trained", "resumed", "already_finished"] = "trained"
    run_key: str | None = None
    registered_version: str | None = None  # with tracking.registered_model: alias "candidate"
    baseline: dict[str, float] = field(default_factory=dict)  # baseline.mllib: its mllib_* metrics


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - started, 2)


def shard_folder_name(cfg: PipelineConfig, fingerprint: str) -> str:
    """Same data, features, split and sharding → the same folder (per number of ranks)."""
    return f"{cfg.name}-{fingerprint[:16]}-w{cfg.train.num_workers}"


def materialize_shards(
    spark: SparkSession,
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
    with _timed(timings, "etl"):
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
        return ShardSet(folder=folder.uri, manifest=manifest, reused=True)
    with _timed(timings, "shards"):
        try:
            val_rows = round(prepared.rows * cfg.split.validation_fraction)
            return write_shards(
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


def train_with_retries(
    spark: SparkSession, spec: TrainSpec, on_event: Callable[[dict[str, Any]], None]
) -> tuple[list[TrainResult], int]:
    """Run the training stage; when a rank fails, run it again (``train.retries`` times).

    Each new attempt resumes from the last checkpoint rank 0 wrote, not from step 0. Returns the
    ranks' results and how many attempts it took. Not retried: bad input found by a rank (a
    shard that does not match its manifest), too few slots (the cluster will not change by
    itself), interrupts. A stalled or lost rank is retried.
    """
    attempts = 1 + spec.train.retries
    settings = BarrierSettings(
        gloo_timeout_s=spec.train.gloo_timeout_s, stall_timeout_s=spec.train.stall_timeout_s
    )  # train_rank sends heartbeats: the stall watch is on
    for attempt in range(attempts):
        # A retry after a lost executor waits for its replacement as long as a start-up may take.
        wait = None if attempt == 0 else settings.startup_s
        try:
            results = run_barrier(
                spark,
                functools.partial(train_rank, dataclasses.replace(spec, attempt=attempt)),
                spec.train.num_workers,
                on_event=on_event,
                settings=dataclasses.replace(settings, slot_wait_s=wait),
                device=spec.train.device,
            )
            return results, attempt + 1
        except BarrierError as err:
            if attempt + 1 == attempts or isinstance(err, InputError | SlotsError):
                raise
            log.warning(
                "training attempt %d of %d failed: %s; running the stage again from the last "
                "checkpoint",
                attempt + 1,
                attempts,
                str(err).splitlines()[0],
            )
            on_event({"event": "retry", "attempt": attempt + 2, "of": attempts})
    raise AssertionError("unreachable")


RUN_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
FINAL_METRICS = (
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_mse",
    "val_mae",
    "val_r2",
    "train_cost",
    "samples_per_second",
    "epoch_seconds",
)


def environment_tags() -> dict[str, str]:
    """The code and libraries behind a run: the git commit of the working directory (when it is
    a git checkout) and the versions of the libraries that decide the result."""
    import importlib.metadata as md
    import subprocess

    tags = {}
    for package in ("torch", "pyspark", "pyarrow", "mlflow", "horovod"):
        try:
            tags[f"versions.{package}"] = md.version(package)
        except md.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


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


def check_trainable(cfg: PipelineConfig, manifest: Manifest) -> None:
    """Enough training rows for every rank to run at least one full step (before submitting)."""
    t = cfg.train
    batch = 1 if cfg.features.task == "clustering" else t.batch_size  # k-means takes no steps
    problem = manifest.split("train").training_problem(t.num_workers, batch, t.tail)
    if problem:
        raise DataError(problem)


def _finished_result(
    previous: Any, target: TrackingTarget, experiment: str, run_key: str, same_config: bool
) -> PipelineResult:
    """What a finished run of the same key produced, read back from MLflow (no new training)."""
    log.info("run key %s finished already in run %s", run_key, previous.info.run_id)
    tags, metrics = previous.data.tags, previous.data.metrics
    warnings = (
        []
        if same_config
        else [
            f"the pipeline config changed since run {previous.info.run_id} finished for run key "
            f"{run_key}; its result stands (--force trains again)"
        ]
    )
    return PipelineResult(
        run_id=previous.info.run_id,
        experiment=experiment,
        tracking_uri=target.tracking_uri,
        ui_command=target.ui_command,
        model_uri=tags.get("model_uri", f"runs:/{previous.info.run_id}/model"),
        shard_folder=tags.get("shards", ""),
        shards_reused=True,
        metrics={k: metrics[k] for k in FINAL_METRICS if k in metrics},
        history=[],
        rows={
            split: int(tags[f"rows.{split}"])
            for split in ("train", "validation")
            if f"rows.{split}" in tags
        },
        warnings=warnings,
        outcome="already_finished",
        run_key=run_key,
    )


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


def _events_to_mlflow(run: TrackedRun) -> Callable[[dict[str, Any]], None]:
    """Rank 0's events as MLflow metrics and tags. Metrics go through MLflow's asynchronous
    logger: queued here, sent in batches; nothing on the ranks waits for the store."""

    def handle(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress" and "global_step" in event:
            run.log_metrics(
                {
                    "train_loss_step": event["window_loss"],
                    "throughput_samples_per_second": event["samples_per_second"],
                },
                step=int(event["global_step"]),
                wait=False,
            )
        elif kind == "epoch":
            run.log_metrics(event["metrics"], step=int(event["epoch"]), wait=False)
        elif kind == "start":
            run.set_tags(
                {
                    "ranks.device": event["device"],
                    "ranks.precision": event.get("precision", "fp32"),
                    "ranks.code": event.get("code", ""),
                }
            )

    return handle


def run_pipeline(
    config: PipelineConfig | str | Path,
    *,
    spark: SparkSession | Callable[[], SparkSession] | None = None,
    tracking_uri: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    rebuild_shards: bool = False,
    run_key: str | None = None,
    force: bool = False,
) -> PipelineResult:
    """Run the whole pipeline and return where everything went.

    ``spark``: an existing session (a notebook's), or a function that makes one when it is needed
    (spark-submit's); otherwise one is made from ``config.spark``.
    ``progress``: receives rank events; by default they are shown on the console.
    ``rebuild_shards``: write the shards again even if committed ones match the fingerprint.
    ``run_key`` (a scheduled run's date, say) makes the call idempotent: a finished run with the
    same key is returned as it is (``outcome="already_finished"``, no Spark, no training); an
    unfinished one (failed, killed) is resumed, the same MLflow run, from its last checkpoint;
    ``force`` starts a fresh run whatever exists.
    """
    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    if run_key is not None and not RUN_KEY_PATTERN.match(run_key):
        raise InputError(
            f"--run-key {run_key!r}: use letters, digits and _ . : + - (up to 128), "
            "e.g. a date 2026-11-22"
        )
    target = resolve_tracking(cfg.tracking, tracking_uri)
    timings: dict[str, float] = {}
    experiment = cfg.tracking.experiment or cfg.name
    tags = {
        "lepton_spark.version": __version__,
        "pipeline": cfg.name,
        "pipeline.hash": cfg.fingerprint(),
        CONFIG_HASH_TAG: cfg.training_fingerprint(),
        **environment_tags(),
    }
    previous = None
    if run_key is not None:
        tags[RUN_KEY_TAG] = run_key
        previous = None if force else find_keyed_run(target, experiment, run_key)
        if previous is not None:
            same_config = previous.data.tags.get(CONFIG_HASH_TAG) == tags[CONFIG_HASH_TAG]
            if previous.info.status == "FINISHED":
                return _finished_result(previous, target, experiment, run_key, same_config)
            if not same_config:
                raise InputError(
                    f"run key {run_key}: the unfinished run {previous.info.run_id} was started "
                    "with another pipeline config (data, features, model or training settings "
                    "changed); --force starts a fresh run"
                )
    console = ConsoleProgress() if progress is None else None
    show = progress or console
    assert show is not None
    resume = previous.info.run_id if previous is not None else None
    # The pipeline and the run key (or the start time): readable in the UI's run list.
    run_name = cfg.tracking.run_name or f"{cfg.name}-{run_key or time.strftime('%Y%m%d-%H%M%S')}"

    with TrackedRun(
        target,
        experiment,
        run_name,
        tags,
        resume_run_id=resume,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
    ) as run:
        if resume is None:
            run.log_params(cfg.flat())
            run.log_text(
                yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False),
                "config.yaml",
            )
        else:
            log.info(
                "run key %s: resuming the unfinished run %s (%s)",
                run_key,
                resume,
                previous.info.status,
            )
        if spark is None:
            spark = spark_session(cfg.spark, app_name=f"lepton-spark {cfg.name}")
        elif not isinstance(spark, SparkSession):
            spark = spark()
        check_slots(spark, cfg.train.num_workers, cfg.train.device)  # before any work
        for warning in shared_storage_warnings(cfg, spark.sparkContext.master):
            log.warning(warning)
        shard_set = materialize_shards(spark, cfg, rebuild=rebuild_shards, timings=timings)
        manifest = shard_set.manifest
        if previous is not None and previous.data.tags.get("dataset.fingerprint") not in (
            None,
            manifest.fingerprint,
        ):
            raise InputError(
                f"run key {run_key}: the data changed since run {resume} started (dataset "
                "fingerprint differs), so its checkpoint does not apply; --force starts a "
                "fresh run"
            )
        try:
            check_trainable(cfg, manifest)
        except DataError:
            if not shard_set.reused:  # written for nothing: do not leave them behind
                locate(shard_set.folder).delete_folder()
            raise
        run.log_json(redact_tree(manifest.model_dump(mode="json", by_alias=True)), "manifest.json")
        rows = {name: s.rows for name, s in manifest.splits.items()}
        skew = {name: s.skew(cfg.train.num_workers) for name, s in manifest.splits.items()}
        run.log_json({n: r.model_dump() for n, r in skew.items()}, "skew_report.json")
        run.log_metrics(
            {
                f"skew_{n}_{k}": getattr(r, k)
                for n, r in skew.items()
                for k in ("shard_max_over_mean", "rank_max_over_mean")
            },
            step=0,
        )
        quality = manifest.source.get("quality") or {}
        if isinstance(quality, dict) and quality:
            run.log_metrics({f"data_{k}": float(v) for k, v in quality.items()}, step=0)
        warnings = skew_warnings(cfg, skew)
        for warning in warnings:
            log.warning(warning)
        run.set_tags(
            {
                "rows.train": rows["train"],
                "rows.validation": rows["validation"],
                "num_workers": cfg.train.num_workers,
                "shards": shard_set.folder,
                "shards.reused": str(shard_set.reused).lower(),
                "shards.strategy": manifest.strategy,
                "dataset.fingerprint": manifest.fingerprint,
            }
        )

        checkpoints = locate(cfg.train.checkpoint_root).child(run.run_id)
        spec = TrainSpec(
            shard_folder=str(shard_set.folder),
            train=cfg.train,
            model=cfg.model,
            checkpoint_dir=checkpoints.uri,
        )
        mlflow_events = _events_to_mlflow(run)

        def on_event(event: dict[str, Any]) -> None:
            mlflow_events(event)
            show(event)

        with _timed(timings, "training"):
            try:
                results, attempts = train_with_retries(spark, spec, on_event)
            finally:
                if console is not None:
                    console.close()
        run.set_tags({"training.attempts": attempts})
        if attempts > 1:
            warnings.append(f"training needed {attempts} attempts; it resumed from checkpoints")
        chief = results[0]
        network = publish.trained_network(cfg, manifest.feature_spec, chief)
        publish.log_pictures(run, chief, network, shard_set)
        example = publish.raw_example(spark, cfg)
        with _timed(timings, "model_logging"):
            model_uri = serving.log_model(
                network, manifest.feature_spec, example, pip_requirements=publish.pip_requirements()
            )
        run.set_tags({"model_uri": model_uri})
        version = None
        if cfg.tracking.registered_model:
            version = register(model_uri, cfg.tracking.registered_model)
            run.set_tags(
                {"registry.model": cfg.tracking.registered_model, "registry.version": version}
            )
        if cfg.compress.enabled:
            with _timed(timings, "compression"):
                publish.log_compressed(run, cfg, shard_set, network, example, version)
        run.log_json(chief.history, "history.json")
        final = {k: v for k, v in chief.history[-1].items() if k != "epoch"}
        if manifest.feature_spec.task == "clustering":  # the final centroids' costs
            run.log_metrics(final, step=int(chief.history[-1]["epoch"]))
        baseline: dict[str, float] = {}
        if cfg.baseline.mllib:
            with _timed(timings, "baseline"):
                baseline = publish.mllib_baseline(spark, cfg, manifest, run)
        run.log_metrics({f"time_{k}_s": v for k, v in timings.items()}, step=0)
        keep_checkpoint(run, checkpoints)
        return PipelineResult(
            run_id=run.run_id,
            experiment=experiment,
            tracking_uri=target.tracking_uri,
            ui_command=target.ui_command,
            model_uri=model_uri,
            shard_folder=shard_set.folder,
            shards_reused=shard_set.reused,
            metrics=final,
            history=chief.history,
            timings=timings,
            rows=rows,
            warnings=warnings,
            outcome="resumed" if resume else "trained",
            run_key=run_key,
            registered_version=version,
            baseline=baseline,
        )


def keep_checkpoint(run: TrackedRun, folder: Location) -> None:
    """Log the last checkpoint as the run's ``checkpoint/`` artifact, then remove the folder
    (training is over; MLflow holds the copy)."""
    source = folder.child(CHECKPOINT_NAME)
    if not source.is_file():
        return
    with tempfile.TemporaryDirectory(prefix="lepton-checkpoint-") as tmp:
        local = Path(source.path) if source.is_local else Path(tmp) / CHECKPOINT_NAME
        if not source.is_local:
            local.write_bytes(source.read_bytes())
        run.log_file(local, "checkpoint")
    folder.delete_folder()
