"""Rank side of the data path: this rank's Arrow shards as torch batches.

Shards are memory-mapped; the packed ``numeric`` and ``categorical`` columns and the ``label``
become torch tensors that share the mapped buffers (no copy), and batches are slices of them. With
shuffling on, shard order and row order within each record batch change every epoch, the same for
the same seed and epoch. No Spark, no MLflow.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from lepton_spark.manifest import ShardInfo, verify_shard
from lepton_spark.spec import CATEGORICAL_COLUMN, LABEL_COLUMN, NUMERIC_COLUMN

# Tensors over read-only mapped memory are never written to; torch warns about it once per array.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class Batch:
    numeric: torch.Tensor  # [rows, n_numeric] float32 (n_numeric may be 0)
    categorical: torch.Tensor  # [rows, n_categorical] int64 (n_categorical may be 0)
    label: torch.Tensor  # [rows] int64

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.numeric, self.categorical, self.label


def _matrix(batch: pa.RecordBatch, column: str, dtype: torch.dtype, width: int) -> torch.Tensor:
    rows = batch.num_rows
    if width == 0:
        return torch.empty((rows, 0), dtype=dtype)
    flat = batch.column(column).flatten().to_numpy(zero_copy_only=True)
    return torch.from_numpy(flat.reshape(rows, width))


def record_batches(path: str | Path, n_numeric: int, n_categorical: int) -> Iterator[Batch]:
    """One :class:`Batch` per record batch of a shard, sharing the memory-mapped file."""
    with pa.memory_map(str(path), "r") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            rb = reader.get_batch(i)
            yield Batch(
                numeric=_matrix(rb, NUMERIC_COLUMN, torch.float32, n_numeric),
                categorical=_matrix(rb, CATEGORICAL_COLUMN, torch.int64, n_categorical),
                label=torch.from_numpy(rb.column(LABEL_COLUMN).to_numpy(zero_copy_only=True)),
            )


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return Batch(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in parts), strict=True)))


def _take(batch: Batch, index: torch.Tensor) -> Batch:
    return Batch(*(t.index_select(0, index) for t in batch.tensors()))


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(*(t[start:stop] for t in batch.tensors()))


class ShardLoader:
    """Batches of ``batch_size`` rows from a list of shards, epoch by epoch.

    ``steps`` caps the batches per epoch (every rank passes the same number, see
    :meth:`lepton_spark.manifest.SplitInfo.steps_per_epoch`); ``drop_last`` drops a short final
    batch. Shards are checked against the manifest (size and sha256) when the loader is made.
    """

    def __init__(
        self,
        folder: str | Path,
        shards: Sequence[ShardInfo],
        *,
        n_numeric: int,
        n_categorical: int,
        batch_size: int,
        steps: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        verify: bool = True,
        prefetch: int = 2,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.paths = [verify_shard(folder, s, checksum=verify) for s in shards]
        self.rows = sum(s.rows for s in shards)
        self.n_numeric = n_numeric
        self.n_categorical = n_categorical
        self.batch_size = batch_size
        self.steps = steps
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch = prefetch

    def __len__(self) -> int:
        full, rest = divmod(self.rows, self.batch_size)
        n = full if self.drop_last or rest == 0 else full + 1
        return n if self.steps is None else min(n, self.steps)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, produced by a background thread ``prefetch`` batches ahead."""
        batches = self._batches(epoch)
        return _prefetched(batches, self.prefetch) if self.prefetch > 0 else batches

    def _batches(self, epoch: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = (
            torch.randperm(len(self.paths), generator=generator).tolist()
            if self.shuffle
            else range(len(self.paths))
        )
        limit = len(self)
        produced = 0
        pending: deque[Batch] = deque()
        pending_rows = 0
        for i in order:
            for part in record_batches(self.paths[i], self.n_numeric, self.n_categorical):
                if self.shuffle:
                    part = _take(part, torch.randperm(len(part), generator=generator))
                pending.append(part)
                pending_rows += len(part)
                while pending_rows >= self.batch_size:
                    if produced == limit:
                        return
                    yield _pop_rows(pending, self.batch_size)
                    pending_rows -= self.batch_size
                    produced += 1
        if pending_rows and produced < limit:
            yield _pop_rows(pending, pending_rows)


def _pop_rows(pending: deque[Batch], n: int) -> Batch:
    """The first ``n`` pending rows: a view when they lie in one record batch, else one copy."""
    parts = []
    while n:
        head = pending[0]
        if len(head) <= n:
            parts.append(pending.popleft())
            n -= len(head)
        else:
            parts.append(_slice(head, 0, n))
            pending[0] = _slice(head, n, len(head))
            n = 0
    return _concat(parts)


_DONE = object()


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``source`` in a thread, ``depth`` items ahead; stops cleanly if the consumer stops."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_DONE)
        except BaseException as err:  # handed to the consumer
            items.put(err)

    thread = threading.Thread(target=produce, name="lepton-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
