"""What a user function sees on its rank: ``context()``. No Spark, no MLflow.

:func:`context` returns the :class:`Context` of the rank this process runs (set by
:mod:`lepton_spark.distributed.rank` before the user's function is called): the rank, the
number of ranks, the local rank, the device, the engine (the process group is up), and:

* ``loader(shards, epoch, batch_size)``: this rank's dealt, shuffled batches of a shard set
  (:func:`lepton_spark.distributed.materialize`), the same deal the built-in loop reads: every
  rank the same number of full batches, new rows every epoch, the same for the same seed;
* ``log_metrics(metrics, step)``: rank 0's metrics, live into the MLflow run through the
  stage's event channel (other ranks' calls are ignored, as with MLflow under torchrun);
* ``checkpoint.save(state)`` / ``checkpoint.load()``: rank 0 writes the state atomically into
  the run's checkpoint folder; every rank reads the last one back after a retry;
* ``heartbeat(epoch, step)``: this rank moved (the stall watch's view, when ``run`` was given
  ``stall_timeout_s``); every batch a loader hands out counts as one.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lepton_spark.errors import InputError
from lepton_spark.events import Event, Metrics, Phase
from lepton_spark.shards.loader import Batch, Layout, ShardLoader, loader_files
from lepton_spark.shards.manifest import Manifest, read_manifest
from lepton_spark.shards.storage import Location, locate

__all__ = ["Checkpoints", "Context", "EpochBatches", "context"]

STATE_NAME = "state.pt"  # what checkpoint.save writes into the run's checkpoint folder

_current: Context | None = None
_lock = threading.Lock()


def context() -> Context:
    """The context of the rank running the current ``lepton_spark.distributed.run`` function."""
    if _current is None:
        raise RuntimeError(
            "lepton_spark.distributed.context() is only available inside a function that "
            "lepton_spark.distributed.run(fn, ...) runs on its ranks"
        )
    return _current


def set_current(ctx: Context | None) -> None:
    global _current
    with _lock:
        _current = ctx


class Checkpoints:
    """``save(state)`` on rank 0 (atomic: a temporary file moved into place, one object on
    object stores), ``load()`` on every rank. The state is what ``torch.save`` takes and
    ``torch.load(weights_only=True)`` gives back: tensors, numbers, strings, lists and dicts
    of them (a model's and an optimizer's ``state_dict``, an epoch)."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.folder = folder
        self.rank = rank

    def _target(self) -> Location:
        if self.folder is None:
            raise InputError(
                "this run has no checkpoint folder: pass checkpoint_dir= to "
                "lepton_spark.distributed.run"
            )
        return locate(self.folder).child(STATE_NAME)

    def save(self, state: Any) -> None:
        """Rank 0 writes ``state``; the other ranks do nothing (call it on every rank)."""
        target = self._target()
        if self.rank != 0:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        parent = locate(self.folder)  # type: ignore[arg-type]
        parent.fs.create_dir(parent.path, recursive=True)
        target.write_bytes_atomic(buffer.getvalue())

    def load(self, map_location: Any = "cpu") -> Any | None:
        """The last saved state, or ``None`` when nothing was saved yet."""
        target = self._target()
        if not target.is_file():
            return None
        return torch.load(
            io.BytesIO(target.read_bytes()), weights_only=True, map_location=map_location
        )


@dataclass(frozen=True)
class EpochBatches:
    """One epoch of this rank's batches: iterate it; ``len`` is the batches every rank gets."""

    loader: ShardLoader
    epoch: int
    device: torch.device
    beat: Callable[[], None] | None = None  # a heartbeat at every batch (the stall watch's view)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader.epoch(self.epoch):
            if self.beat is not None:
                self.beat()
            yield batch.to(self.device)


@dataclass
class Context:
    """The rank's view of its stage (see the module docstring)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    device: torch.device
    backend: str  # "ddp", "fsdp", "horovod" or "none"
    attempt: int  # 0 on the first try, then 1, 2 ... on retries
    checkpoint: Checkpoints
    engine: Any = None  # lepton_spark.training.engines.Engine (None for backend "none")
    report: Callable[[Event], None] | None = field(default=None, repr=False)
    beat: Callable[..., None] | None = field(default=None, repr=False)
    kept: list[dict[str, Any]] = field(default_factory=list, repr=False)  # rank 0's metrics
    _loaders: dict[tuple[Any, ...], ShardLoader] = field(default_factory=dict, repr=False)
    _position: tuple[int, int] = (0, 0)

    @property
    def mesh(self) -> Any:
        """FSDP's device mesh over every rank (``fully_shard(module, mesh=ctx.mesh)``)."""
        return getattr(self.engine, "mesh", None)

    def loader(
        self,
        shards: Any,
        epoch: int = 0,
        batch_size: int = 512,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 65_536,
        verify: bool = True,
    ) -> EpochBatches:
        """This rank's batches of ``split`` for ``epoch``, on the rank's device.

        ``shards`` is a :class:`~lepton_spark.shards.writer.ShardSet` (what ``materialize``
        returns) or a committed shard folder's path or URI. The training split is dealt: every
        rank gets ``steps_per_epoch`` full batches of rows no other rank has this epoch. The
        validation split is read whole over the ranks, each row once (a short last batch kept).
        The shards are checked against their manifest (sizes, and checksums: each rank
        checksums its part) the first time a rank asks for a split.
        """
        folder = str(getattr(shards, "folder", shards))
        manifest: Manifest = getattr(shards, "manifest", None) or read_manifest(folder)
        key = (folder, split, batch_size, shuffle, seed, shuffle_buffer)
        if key not in self._loaders:
            self._loaders[key] = self._open(
                folder, manifest, split, batch_size, shuffle, seed, shuffle_buffer, verify
            )
        if split == "train":
            self.heartbeat(epoch, 0)  # a training epoch starts
        else:
            self.heartbeat()  # evaluating within the current epoch
        return EpochBatches(self._loaders[key], epoch, self.device, self.heartbeat)

    def _open(
        self,
        folder: str,
        manifest: Manifest,
        split: str,
        batch_size: int,
        shuffle: bool,
        seed: int,
        shuffle_buffer: int,
        verify: bool,
    ) -> ShardLoader:
        if split not in manifest.splits:
            raise InputError(
                f"the shards at {folder} have no split {split!r} (they have "
                f"{', '.join(sorted(manifest.splits))})"
            )
        info = manifest.split(split)
        layout = Layout.of(manifest.feature_spec)
        common: dict[str, Any] = {
            "layout": layout,
            "verify": verify,
            "pin_memory": self.device.type == "cuda",
        }
        if split != "train":
            files, share = loader_files(info, self.rank, self.size, every_row=True)
            return ShardLoader(
                folder, files, batch_size=batch_size, drop_last=False, share=share, **common
            )
        problem = info.training_problem(self.size, batch_size, "drop")
        if problem:
            raise InputError(f"rank {self.rank}: {problem}")
        files, share = loader_files(info, self.rank, self.size, seed=seed)
        return ShardLoader(
            folder,
            files,
            batch_size=batch_size,
            steps=info.steps_per_epoch(self.size, batch_size, "drop"),
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            seed=seed + 7919 * self.rank,
            share=share,
            **common,
        )

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Rank 0's ``metrics`` at ``step`` into the MLflow run, as they happen (``mlflow
        .log_metrics`` on the driver). Other ranks' calls are ignored."""
        if self.rank != 0:
            return
        event = Metrics(
            rank=self.rank, step=step, metrics={k: float(v) for k, v in metrics.items()}
        )
        self.kept.append(event.model_dump(mode="json"))
        if self.report is not None:
            self.report(event)

    def heartbeat(self, epoch: int | None = None, step: int | None = None) -> None:
        """This rank moved: at ``step`` of ``epoch`` (by default one step further). With
        ``stall_timeout_s`` given to ``run``, a rank that goes that long without a heartbeat
        is stopped and the stage fails naming it. Each batch of :meth:`loader` beats by
        itself; call it in loops that read no batches from it."""
        last_epoch, last_step = self._position
        epoch = last_epoch if epoch is None else max(0, int(epoch))
        step = (last_step + 1 if epoch == last_epoch else 0) if step is None else int(step)
        self._position = (epoch, step)
        if self.beat is not None:
            self.beat(epoch, step, Phase.TRAINING)
