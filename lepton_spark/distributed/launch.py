"""``run(fn, ...)``: a user function on every rank of one barrier stage, the driver's side.

The same stage as the pipeline's training (:func:`~lepton_spark.cluster.stage.run_barrier`):
the slots checked before submitting, the guarded start-up (Horovod's rendezvous or the
torch.distributed store, served by rank 0's task for this stage only), one child process per
rank, the signed event channel, the stall watch (with ``stall_timeout_s``), Ctrl-C cancelling
the stage, retries from the function's checkpoint and elastic retries
(:func:`~lepton_spark.cluster.attempts.run_attempts`). Classic Spark and Spark Connect alike.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lepton_spark.cluster.attempts import run_attempts
from lepton_spark.cluster.stage import BarrierSettings
from lepton_spark.distributed.rank import BACKENDS, RankOutput, RunSettings, UserCall
from lepton_spark.errors import ConfigError
from lepton_spark.events import Event
from lepton_spark.shards.storage import check_writable, locate
from lepton_spark.sparkinfo import default_parallelism
from lepton_spark.tracking.function_run import FunctionRun

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_ROOT = ".lepton/checkpoints"


def run(
    fn: Callable[..., Any],
    *args: Any,
    num_workers: int | None = None,
    backend: str = "ddp",
    spark: Any = None,
    return_all: bool = False,
    retries: int = 0,
    min_workers: int | None = None,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    stall_timeout_s: float | None = None,
    gloo_timeout_s: int = 120,
    events_host: str | None = None,
    experiment: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    warm_ranks: bool = True,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``num_workers`` ranks of one Spark barrier stage.

    ``backend``: ``"ddp"`` or ``"fsdp"`` (``torch.distributed`` is initialised before ``fn``
    starts: Gloo on CPU, NCCL on GPU; wrap the model with ``DistributedDataParallel`` or
    ``fully_shard`` yourself), ``"horovod"`` (``hvd.init()`` done), ``"none"`` (no process
    group: ranks that need no collectives). Inside ``fn``,
    :func:`lepton_spark.distributed.context` gives the rank, size, device, shard loader,
    ``log_metrics``, ``checkpoint`` and ``heartbeat``.

    Returns rank 0's value, or every rank's in rank order with ``return_all`` (only what is
    returned travels back to the driver: without it, the other ranks' values are dropped on
    their ranks). A rank's error
    fails the stage as a :class:`~lepton_spark.errors.BarrierError` naming the rank, its host
    and the error (bad input of the function's own, an ``InputError``, as
    :class:`~lepton_spark.errors.RankInputError`). With ``retries``, a failed stage runs
    again: ``context().attempt`` says which, and ``context().checkpoint.load()`` returns what
    rank 0 last saved; ``min_workers`` lets a retry go on with fewer ranks. ``checkpoint_dir``
    (a path or an object-store URI every rank reaches) defaults to a new folder under
    ``.lepton/checkpoints``; pass the same one again to resume a run across sessions.
    ``stall_timeout_s``: a rank that goes that long without ``context().heartbeat()`` (or a
    loader epoch) is stopped and the stage fails naming it; ``None``, the default, watches no
    steps (start-up is bounded all the same by ``gloo_timeout_s``). Metrics go to the active
    MLflow run, or a new run of ``experiment`` (``lepton-spark-run``) opened at the first one.
    ``warm_ranks``: fork the ranks from the executor's warm process, torch already imported
    (``False``: a fresh interpreter for each rank; see ``train.warm_ranks``).
    ``spark``: the session (classic or Connect; default: the active one). Every other keyword
    goes to ``fn``.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    spark = spark if spark is not None else _active_session()
    workers = num_workers if num_workers is not None else default_parallelism(spark)
    if workers < 1 or (min_workers is not None and not 1 <= min_workers <= workers):
        raise ConfigError(
            f"num_workers must be at least 1 and min_workers between 1 and num_workers "
            f"(got num_workers={workers}, min_workers={min_workers})"
        )
    folder = _checkpoint_folder(checkpoint_dir)
    settings = BarrierSettings(
        gloo_timeout_s=gloo_timeout_s,
        stall_timeout_s=stall_timeout_s,
        events_host=events_host,
        engine="horovod" if backend == "horovod" else "ddp",  # "fsdp", "none": the store
        stall_setting="run(stall_timeout_s=)",
        warm_ranks=warm_ranks,
    )

    def attempt(number: int, ranks: int) -> UserCall:
        return UserCall(
            fn,
            args,
            kwargs,
            RunSettings(
                backend=backend,
                device=device,
                checkpoint_dir=folder,
                gloo_timeout_s=gloo_timeout_s,
                stall_timeout_s=stall_timeout_s,
                attempt=number,
                return_all=return_all,
            ),
        )

    tracking = FunctionRun(experiment, run_name=getattr(fn, "__name__", None))

    def events(event: Event) -> None:
        tracking(event)
        if on_event is not None:
            on_event(event)

    try:
        results, attempts = run_attempts(
            spark,
            attempt,
            num_workers=workers,
            retries=retries,
            min_workers=min_workers,
            settings=settings,
            device=device,
            on_event=events,
        )
        outputs: list[RankOutput] = results
        missed = tracking.replay(outputs[0].reports)
        if missed:
            log.warning(
                "%d of rank 0's metrics never reached this driver while the function ran; "
                "logged to MLflow now",
                missed,
            )
    except BaseException as err:
        tracking.close(err)
        raise
    tracking.close()
    if attempts > 1:
        log.info("the function finished after %d attempts", attempts)
    values = [out.value for out in outputs]
    return values if return_all else values[0]


def _active_session() -> Any:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None:
        try:  # a Spark Connect client's session
            from pyspark.sql.connect.session import SparkSession as ConnectSession

            active = ConnectSession.getActiveSession()
        except ImportError:
            active = None
    if active is None:
        raise ConfigError(
            "lepton_spark.distributed.run needs a Spark session: pass spark=, or start one "
            "first (SparkSession.builder.getOrCreate())"
        )
    return active


def _checkpoint_folder(where: str | Path | None) -> str:
    place = locate(where or f"{DEFAULT_CHECKPOINT_ROOT}/run-{uuid.uuid4().hex[:12]}")
    if place.is_local:
        check_writable(Path(place.path), "checkpoint_dir")
    return place.uri
