"""The supervised rank loop, as steps: set up, resume, train an epoch, evaluate, reduce, checkpoint.

Every rank runs the same steps in the same order (they join the same collectives);
:func:`lepton_spark.training.worker.train_worker` calls them. ``engine`` is the rank's
:class:`~lepton_spark.training.engines.Engine` (Horovod, DDP or FSDP), passed in so that this
module imports none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lepton_spark.errors import InputError
from lepton_spark.events import Epoch, Phase, Progress, Start
from lepton_spark.models import build_model, set_activation_checkpointing
from lepton_spark.names import TRAIN_EPOCH_SECONDS, TRAIN_LOSS, TRAIN_SAMPLES_PER_SECOND, current
from lepton_spark.shards.loader import Layout, ShardLoader, loader_files
from lepton_spark.shards.manifest import Manifest, SplitInfo, read_manifest
from lepton_spark.training.checkpoint import (
    SHARDED_PREFIX,
    Checkpoint,
    Position,
    fetched_sharded,
    load_checkpoint,
    remove_sharded,
    save_checkpoint,
    staged_sharded,
)
from lepton_spark.training.devices import (
    FP32,
    Precision,
    autocast,
    choose_device,
    choose_precision,
)
from lepton_spark.training.engines import Engine, broadcast_bytes
from lepton_spark.training.faults import inject_fault, planned_fault
from lepton_spark.training.heartbeat import Beat
from lepton_spark.training.job import Report, TrainSpec, code_location
from lepton_spark.training.objectives import Objective
from lepton_spark.training.optim import make_optimizer, make_schedule, scaled_lr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankData:
    """This rank's view of the shards: the manifest, its loaders, the steps every rank runs."""

    manifest: Manifest
    train_split: SplitInfo
    train: ShardLoader
    validation: ShardLoader
    steps: int
    device: torch.device


def open_data(spec: TrainSpec, rank: int, size: int, local_rank: int, beat: Beat) -> RankData:
    """Read the manifest, check this rank can take a full step, and open its loaders (their
    shards' checksums are verified here, the heartbeat moving as they are)."""
    cfg = spec.train
    manifest = read_manifest(spec.shard_folder)
    features = manifest.feature_spec
    train_split, val_split = manifest.split("train"), manifest.split("validation")
    batch_size = 1 if features.task == "clustering" else cfg.batch_size  # k-means: no steps
    problem = train_split.training_problem(size, batch_size, cfg.tail)
    if problem:  # the driver checks this before submitting; callers without it get it here
        raise InputError(f"rank {rank}: {problem}")
    steps = train_split.steps_per_epoch(size, cfg.batch_size, cfg.tail)
    device = choose_device(cfg.device, local_rank)
    common: dict[str, Any] = {
        "layout": Layout.of(features),
        "verify": spec.verify_shards,
        "pin_memory": device.type == "cuda",
        "on_verified": functools.partial(beat, -1),  # start-up moves while checksumming
    }
    # The deal of row blocks is seeded the same on every rank; the shuffle buffer per rank.
    files, share = loader_files(train_split, rank, size, seed=cfg.seed)
    train = ShardLoader(
        spec.shard_folder,
        files,
        batch_size=cfg.batch_size,
        steps=steps,
        shuffle=cfg.shuffle,
        shuffle_buffer=cfg.shuffle_buffer,
        tail=cfg.tail,
        seed=cfg.seed + 7919 * rank,
        share=share,
        **common,
    )
    files, share = loader_files(val_split, rank, size, every_row=True)
    validation = ShardLoader(
        spec.shard_folder,
        files,
        batch_size=max(cfg.batch_size, 4096),
        drop_last=False,
        share=share,
        **common,
    )
    return RankData(manifest, train_split, train, validation, steps, device)


@dataclass
class Trainer:
    """One rank's model, optimizer and schedule, and how it computes a step."""

    engine: Engine
    model: nn.Module  # as the engine wrapped it (DDP, FSDP) or as built (Horovod)
    optimizer: Any  # Horovod: hvd.DistributedOptimizer over a torch optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    layout: Layout
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler | None

    def step(self, batch: Any, first: bool = True, last: bool = True, of: int = 1) -> torch.Tensor:
        """Forward and backward of one batch, the ``of`` batches of one optimizer step
        (``train.accumulate_steps``) adding up their gradients: the ``first`` clears them, the
        ``last`` has them averaged over the ranks and takes the optimizer and schedule step.
        The batch's loss."""
        batch = batch.to(self.device)
        if first:
            self.optimizer.zero_grad()
        # DDP decides in the forward pass whether the backward syncs: both go inside.
        with contextlib.nullcontext() if last else self.engine.accumulating(self.model):
            with autocast(self.device, self.precision):
                outputs = self.model(self.layout.inputs(batch))
            loss = self.objective.loss(outputs.float(), batch.label, batch.weight)
            scaled = loss / of if of > 1 else loss
            if not last:
                self.engine.backward(scaled, self.scaler)
        if last:
            self.engine.step(scaled, self.optimizer, self.scaler)
            self.schedule.step()
        return loss.detach()


def set_up(spec: TrainSpec, engine: Engine, data: RankData) -> Trainer:
    """The model (seeded), wrapped by the engine with its optimizer (learning rate scaled for
    the ranks), the schedule over the whole run, the objective."""
    cfg = spec.train
    features = data.manifest.feature_spec
    precision = choose_precision(cfg.mixed_precision, data.device)
    model = build_model(spec.model, features, seed=cfg.seed)
    set_activation_checkpointing(model, cfg.activation_checkpointing)  # before the engine wraps
    lr = scaled_lr(cfg, engine.size())
    model, optimizer = engine.wrap(model, lambda ps: make_optimizer(cfg, ps, lr), data.device)
    return Trainer(
        engine=engine,
        model=model,
        optimizer=optimizer,
        schedule=make_schedule(
            cfg,
            optimizer,
            total_steps=optimizer_steps(data.steps, cfg.accumulate_steps) * cfg.epochs,
        ),
        objective=Objective(features, cfg),
        layout=data.train.layout,
        device=data.device,
        precision=precision,
        scaler=torch.amp.GradScaler(data.device.type) if precision.scaler else None,
    )


def optimizer_steps(steps: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``steps`` batches (the last one may take fewer)."""
    return -(-steps // accumulate)


def accumulation_group(step: int, steps: int, accumulate: int) -> tuple[bool, bool, int]:
    """For batch ``step`` (1-based) of an epoch of ``steps``: whether it opens its optimizer
    step, whether it closes it, and how many batches that step has."""
    start = (step - 1) // accumulate * accumulate + 1
    size = min(accumulate, steps - start + 1)
    return step == start, step == start + size - 1, size


@dataclass(frozen=True)
class Resumed:
    """Where this attempt starts: the position, the history so far, the checkpoint's place."""

    position: Position
    history: list[dict[str, float]]
    checkpoint_at: tuple[int, int] | None  # (epoch, step), None: from the start


def resume(spec: TrainSpec, engine: Engine, trainer: Trainer, steps: int | None = None) -> Resumed:
    """Load the run's checkpoint on rank 0 (if there is one), agree on the position, and give
    every rank its model and optimizer state: rank 0's whole state (:meth:`Engine.load_state`),
    or, for a sharded checkpoint (FSDP), each rank's part read from the folder the record names
    (:meth:`Engine.load_sharded`), whatever the number of ranks that wrote it.

    Nothing is unpickled from the network: rank 0's resume state (position, history, schedule;
    the optimizer's state too, for Horovod and DDP) goes to the other ranks as a tensor of
    ``torch.save`` bytes that they read with ``torch.load(weights_only=True)`` (tensors and plain
    values only), and the parameters as tensors (Horovod's ``broadcast_object`` /
    ``broadcast_optimizer_state`` would unpickle whatever arrives on a Gloo pair).

    A checkpoint written by another number of ranks (an elastic retry: see
    :func:`rescale_for_ranks`) goes on with this attempt's ranks; ``steps`` is this attempt's
    steps per epoch.
    """
    payload = b""
    ckpt = None
    if engine.rank() == 0 and spec.checkpoint_dir:
        ckpt = load_checkpoint(spec.checkpoint_dir)
        if ckpt is not None:
            state = {
                "position": dataclasses.asdict(ckpt.position),
                "history": ckpt.history,
                "schedule": ckpt.schedule,
                "size": ckpt.size,
                "sharded": ckpt.sharded,
            }
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = buffer.getvalue()
    payload = broadcast_bytes(engine, payload, name="resume")
    state = torch.load(io.BytesIO(payload), weights_only=True) if payload else None
    if state is not None and state.get("sharded"):  # every rank reads its part
        with fetched_sharded(spec.checkpoint_dir, state["sharded"]) as folder:
            engine.load_sharded(trainer.model, trainer.optimizer, folder)
    else:
        engine.load_state(
            trainer.model,
            trainer.optimizer,
            ckpt.model if ckpt is not None else None,
            ckpt.optimizer if ckpt is not None else None,
        )
    if state is None:
        return Resumed(Position(), [], None)
    position = Position(**state["position"])
    history = [{current(k): v for k, v in epoch.items()} for epoch in state["history"]]  # 0.1
    trainer.schedule.load_state_dict(state["schedule"])
    written_by = state.get("size")
    if written_by and written_by != engine.size():
        position = rescale_for_ranks(spec, trainer, position, written_by, engine.size(), steps)
    log.info("rank %d resumes at epoch %d, step %d", engine.rank(), position.epoch, position.step)
    return Resumed(position, history, (position.epoch, position.step))


def rescale_for_ranks(
    spec: TrainSpec, trainer: Trainer, position: Position, old: int, new: int, steps: int | None
) -> Position:
    """A checkpoint of ``old`` ranks resumed by ``new``: the learning rate (and the schedule's
    base) scaled as ``train.lr_scaling`` scales it for ``new`` ranks, the epoch's steps done
    counted in ``new`` ranks' steps (the same number of rows seen, as near as whole steps go: the
    rows are dealt to the ranks anew), a cosine schedule stretched over the steps now left."""
    cfg = spec.train
    ratio = scaled_lr(cfg, new) / scaled_lr(cfg, old)
    for group in trainer.optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    schedule: Any = trainer.schedule
    schedule.base_lrs = [lr * ratio for lr in schedule.base_lrs]
    k = cfg.accumulate_steps
    step = round(position.step * old / new / k) * k  # on an optimizer step's boundary
    if steps is not None:
        step = min(step, steps)
        left = optimizer_steps(steps - step, k) + (cfg.epochs - position.epoch - 1) * (
            optimizer_steps(steps, k)
        )
        if hasattr(schedule, "T_max"):
            schedule.T_max = max(schedule.last_epoch + left, 1)
    log.warning(
        "resuming a checkpoint of %d ranks with %d: learning rate ×%.3g, epoch %d at step %d",
        old,
        new,
        ratio,
        position.epoch + 1,
        step,
    )
    return Position(position.epoch, step, position.global_step)


def announce(
    report: Report | None, spec: TrainSpec, size: int, data: RankData, trainer: Trainer, at: Resumed
) -> None:
    """Rank 0 tells the driver the attempt has started (the console's first line, tags)."""
    if report:
        report(
            Start(
                size=size,
                device=str(data.device),
                precision=trainer.precision.name,
                epochs=spec.train.epochs,
                steps_per_epoch=data.steps,
                attempt=spec.attempt,
                resumed_from=at.checkpoint_at,
                code=code_location(),
            )
        )


@dataclass(frozen=True)
class EpochRun:
    """What training one epoch left behind, before the ranks compare notes."""

    loss_sum: torch.Tensor  # float64 on the device: this rank's summed batch losses
    steps_done: int  # steps trained in this attempt (after the checkpoint's position)
    global_step: int
    seconds: float


def train_epoch(
    spec: TrainSpec,
    rank: int,
    size: int,
    data: RankData,
    trainer: Trainer,
    start: Position,
    history: list[dict[str, float]],
    report: Report | None,
    beat: Beat,
) -> EpochRun:
    """Epoch ``start.epoch``'s steps from ``start`` (``start.step`` batches of it done, at
    ``start.global_step``; batches already trained on are skipped: the loader's order is the
    same), with progress reports, per-step checkpoints, and the planned fault of the tests."""
    cfg = spec.train
    epoch, done, global_step = start.epoch, start.step, start.global_step
    started = time.perf_counter()
    trainer.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    window = _Window(done, loss_sum)
    fault = planned_fault(cfg, spec.attempt, rank)
    last_checkpoint = global_step
    for step, batch in enumerate(data.train.epoch(epoch), start=1):
        beat(epoch, step)
        if step <= done:
            continue
        first, last, of = accumulation_group(step, data.steps, cfg.accumulate_steps)
        loss_sum += trainer.step(batch, first, last, of)
        global_step += 1
        if fault is not None and global_step == fault[1]:
            inject_fault(fault[0], rank, global_step)
        if report and (step % cfg.progress_every_steps == 0 or step == data.steps):
            # Rank 0's view: its own loss (the ranks' mean comes with the epoch's metrics),
            # the cluster's throughput since the last report.
            report(
                Progress(
                    epoch=epoch + 1,
                    step=step,
                    steps=data.steps,
                    global_step=global_step,
                    loss=loss_sum.item() / (step - done),
                    **window.advance(step, loss_sum, cfg.batch_size * size),
                )
            )
        every = cfg.checkpoint_every_steps
        # Between optimizer steps only, once per multiple of `every` batches passed.
        if every and last and global_step // every > last_checkpoint // every and step < data.steps:
            last_checkpoint = global_step
            beat(epoch, step, Phase.CHECKPOINT)
            checkpoint(spec, rank, trainer, history, Position(epoch, step, global_step))
    return EpochRun(loss_sum, data.steps - done, global_step, time.perf_counter() - started)


def evaluate(
    model: nn.Module,
    loader: ShardLoader,
    device: torch.device,
    objective: Objective,
    on_batch: Callable[[int], None] | None = None,
    precision: Precision = FP32,
    forwards: int | None = None,
    spare: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """The objective's validation sums over the loader (float64, for one allreduce).

    ``forwards``: run that many forward passes in all (FSDP: each is a collective, and every rank
    must run as many), the ones past this rank's batches on its last batch (or on ``spare()``
    when it has none), counted nowhere.
    """
    totals = objective.zeros()
    layout = loader.layout
    model.eval()
    last, n = None, 0
    with torch.no_grad():
        for n, batch in enumerate(loader.epoch(0), start=1):
            if on_batch is not None:
                on_batch(n - 1)
            last = batch.to(device)
            with autocast(device, precision):
                outputs = model(layout.inputs(last))
            objective.accumulate(totals, outputs.float(), last.label)
        for _ in range(n, forwards or 0):
            if last is None:
                last = spare().to(device) if spare is not None else None
            if last is None:
                raise InputError("no batch to run the padding forward passes of an FSDP rank on")
            with autocast(device, precision):
                model(layout.inputs(last))
    return totals


def reduce_epoch(
    engine: Engine, trainer: Trainer, run: EpochRun, validation: torch.Tensor, batch_size: int
) -> tuple[dict[str, float], list[list[int]] | None]:
    """One allreduce per epoch — [rank mean train loss, the objective's validation sums…] —
    and the epoch's metrics and confusion matrix from it."""
    size = engine.size()
    mean_loss = (run.loss_sum.cpu() / max(run.steps_done, 1)).to(torch.float64).reshape(1)
    totals = engine.allreduce(torch.cat([mean_loss, validation.cpu()]), name="epoch_totals")
    metrics = {
        TRAIN_LOSS: float(totals[0] / size),
        **trainer.objective.metrics(totals[1:]),
        TRAIN_SAMPLES_PER_SECOND: run.steps_done * batch_size * size / run.seconds,
        TRAIN_EPOCH_SECONDS: run.seconds,
    }
    return metrics, trainer.objective.confusion(totals[1:])


def checkpoint(
    spec: TrainSpec,
    rank: int,
    trainer: Trainer,
    history: list[dict[str, float]],
    position: Position,
) -> None:
    """Write where training stands (every rank calls this): the whole state, gathered by the
    engine into rank 0's record, or (FSDP) each rank's part into a sharded folder, then rank 0's
    record naming it."""
    if not spec.checkpoint_dir:
        return
    engine = trainer.engine
    sharded = None
    if engine.shards_state():  # FSDP: each rank writes its part, then rank 0 the record
        token = secrets.token_hex(4) if rank == 0 else ""
        token = broadcast_bytes(engine, token.encode(), name="checkpoint.name").decode()
        sharded = f"{SHARDED_PREFIX}{position.global_step:09d}-{token}"
        with staged_sharded(spec.checkpoint_dir, sharded) as folder:
            engine.save_sharded(trainer.model, trainer.optimizer, folder)
        engine.allreduce(torch.zeros(1), name="checkpoint.written")  # every part is in place
        model, optimizer = {}, {}
    else:
        model = engine.model_state(trainer.model)
        optimizer = engine.optimizer_state(trainer.model, trainer.optimizer)
    if rank != 0:
        return
    save_checkpoint(
        spec.checkpoint_dir,
        Checkpoint(
            position=position,
            model=model,
            optimizer=optimizer,
            schedule=trainer.schedule.state_dict(),
            history=list(history),
            size=engine.size(),
            sharded=sharded,
        ),
    )
    if sharded is not None:
        remove_sharded(spec.checkpoint_dir, keep=sharded)


def report_epoch(report: Report | None, epoch: int, metrics: dict[str, float]) -> None:
    if report:
        report(Epoch(epoch=epoch, metrics=metrics))


class _Window:
    """Loss and throughput since the last progress report (what the per-step metrics show)."""

    def __init__(self, step: int, loss_sum: torch.Tensor) -> None:
        self.step = step
        self.loss = float(loss_sum)
        self.time = time.perf_counter()

    def advance(self, step: int, loss_sum: torch.Tensor, samples_per_step: int) -> dict[str, float]:
        now, loss = time.perf_counter(), float(loss_sum)
        steps = max(step - self.step, 1)
        out = {
            "window_loss": (loss - self.loss) / steps,
            "samples_per_second": steps * samples_per_step / max(now - self.time, 1e-9),
        }
        self.step, self.loss, self.time = step, loss, now
        return out
