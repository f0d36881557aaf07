"""Rank side of the data path: this rank's Arrow shards as torch batches.

Local shards are memory-mapped; the packed ``numeric`` and ``categorical`` columns and the
``label`` become torch tensors that share the mapped buffers (no copy), and unshuffled batches are
slices of them. Shards on other filesystems (``pyarrow.fs`` URIs) are read a record batch at a time.

A split dealt by row blocks (``SplitInfo.deal == "blocks"``, the ``random`` strategy) is read
through a :class:`Share`: every epoch this rank reads the row ranges
:func:`~lepton_spark.shards.deal.rank_ranges` deals it (``rows // size`` rows, from every file,
new each epoch), as zero-copy slices of record batches. A split of whole shards per rank
(``hash``, ``range``, format 2) is read shard by shard. With shuffling on, every epoch (same seed
and epoch, same order) visits the ranges (or the rank's shards and each one's record batches) in a
random order and mixes rows through a shuffle buffer of ``shuffle_buffer`` rows that spans record
batches and shards. Memory does not grow with the dataset: a dealt epoch keeps one local file mapped
at a time (pages a mapping touched count in the rank's RSS until it is unmapped), a whole-shard
epoch one shard. On CUDA, and for shards on remote filesystems, a
background thread reads, shuffles and pins the next chunks while the GPU or the network works; on a
busy CPU with local shards the loader runs inline, which measured faster (``benchmarks/data_path``:
a second Python thread competes with torch's own threads for the same cores). No Spark, no MLflow.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from lepton_spark.shards.deal import RowIndex, rank_ranges
from lepton_spark.shards.manifest import Manifest, ShardInfo, SplitInfo, verify_shard
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import (
    ARRAY_PREFIX,
    CATEGORICAL_COLUMN,
    LABEL_COLUMN,
    NUMERIC_COLUMN,
    TEXT_PREFIX,
    WEIGHT_COLUMN,
    FeatureSpec,
)


@dataclass(frozen=True)
class Batch:
    numeric: torch.Tensor  # [rows, n_numeric] float32 (n_numeric may be 0)
    categorical: torch.Tensor  # [rows, n_categorical] int64 (n_categorical may be 0)
    label: torch.Tensor  # [rows] int64 classes, or float32 regression targets
    weight: torch.Tensor | None = None  # [rows] float32 sample weights, when the spec has them
    extras: tuple[torch.Tensor, ...] = ()  # array features [rows, length], then text [rows, L]

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device) -> Batch:
        """On ``device``, copied from pinned memory without blocking."""
        if device.type == "cpu":
            return self
        return self.pinned().map(lambda t: t.to(device, non_blocking=True))

    def pinned(self) -> Batch:
        if self.label.is_pinned():
            return self
        return self.map(lambda t: t.pin_memory())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        weight = () if self.weight is None else (self.weight,)
        return (self.numeric, self.categorical, self.label, *weight, *self.extras)

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Batch:
        """A batch of this one's structure from ``tensors`` in :meth:`tensors` order."""
        numeric, categorical, label, *rest = tensors
        weight = rest.pop(0) if self.weight is not None else None
        return Batch(numeric, categorical, label, weight, tuple(rest))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return self.rebuild([fn(t) for t in self.tensors()])


@dataclass(frozen=True)
class Layout:
    """Which columns a shard has and how a batch becomes the model's inputs."""

    n_numeric: int
    n_categorical: int
    weight: bool = False
    arrays: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, per-row shape)
    texts: tuple[tuple[str, int], ...] = ()  # (name, max_length)

    @classmethod
    def of(cls, spec: FeatureSpec) -> Layout:
        return cls(
            n_numeric=len(spec.numeric),
            n_categorical=len(spec.categorical),
            weight=spec.weight is not None,
            arrays=tuple((a.name, tuple(a.shape)) for a in spec.arrays),
            texts=tuple((t.name, t.max_length) for t in spec.texts),
        )

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The dict a model's ``forward`` takes (see :mod:`lepton_spark.spec`)."""
        out = {"numeric": batch.numeric, "categorical": batch.categorical}
        extras = iter(batch.extras)
        for name, shape in self.arrays:
            tensor = next(extras)
            out[name] = tensor.reshape(len(tensor), *shape)
        for name, _ in self.texts:
            out[name] = next(extras)
        return out


_READ_ONLY_SEEN = False


def _tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor over ``values``' memory. Shard buffers are read-only (memory-mapped) and are never
    written to; torch warns, once per process, that it cannot enforce that. That one warning is
    kept out of the user's output here, without touching the warning filters for good.
    """
    global _READ_ONLY_SEEN
    if values.flags.writeable or _READ_ONLY_SEEN:
        return torch.from_numpy(values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(values)
    _READ_ONLY_SEEN = True
    return tensor


def _matrix(batch: pa.RecordBatch, column: str, width: int) -> torch.Tensor:
    rows = batch.num_rows
    if width == 0:
        return torch.empty((rows, 0), dtype=torch.float32)
    flat = batch.column(column).flatten().to_numpy(zero_copy_only=True)
    return _tensor(flat.reshape(rows, width))


def _to_batch(rb: pa.RecordBatch, layout: Layout) -> Batch:
    categorical = _matrix(rb, CATEGORICAL_COLUMN, layout.n_categorical)
    extras = [_matrix(rb, ARRAY_PREFIX + name, prod(shape)) for name, shape in layout.arrays] + [
        _matrix(rb, TEXT_PREFIX + name, length) for name, length in layout.texts
    ]
    weight = None
    if layout.weight:
        weight = _tensor(rb.column(WEIGHT_COLUMN).to_numpy(zero_copy_only=True))
    return Batch(
        numeric=_matrix(rb, NUMERIC_COLUMN, layout.n_numeric),
        categorical=categorical if layout.n_categorical else categorical.long(),
        label=_tensor(rb.column(LABEL_COLUMN).to_numpy(zero_copy_only=True)),
        weight=weight,
        extras=tuple(extras),
    )


def record_batches(
    place: str | Path | Location,
    layout: Layout,
    shuffle: torch.Generator | None = None,
) -> Iterator[Batch]:
    """One :class:`Batch` per record batch of a shard (in a random order drawn from ``shuffle``).

    Local shards are memory-mapped and the tensors share the mapping; the mapping lives as long as
    a tensor over it does.
    """
    with locate(place).open_for_reading() as source:
        reader = pa.ipc.open_file(source)
        count = reader.num_record_batches
        order = range(count) if shuffle is None else _permutation(count, shuffle)
        for i in order:
            yield _to_batch(reader.get_batch(i), layout)


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    columns = zip(*(p.tensors() for p in parts), strict=True)
    return parts[0].rebuild([torch.cat(ts) for ts in columns])


def _take(batch: Batch, index: torch.Tensor) -> Batch:
    return batch.map(lambda t: t.index_select(0, index))


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return batch.map(lambda t: t[start:stop])


Tail = Literal["drop", "pad"]


@dataclass(frozen=True)
class Share:
    """This rank's part of a split dealt by row blocks (see :mod:`lepton_spark.shards.deal`).

    ``rows // size`` rows dealt afresh every epoch from ``seed`` (the same on every rank); with
    ``every_row``, every row of the split exactly once over the ranks, the same deal every epoch
    (validation, k-means: each rank still a slice of every part of the split).
    """

    rank: int
    size: int
    seed: int = 0
    every_row: bool = False

    def rows(self, split_rows: int) -> int:
        extra = self.every_row and self.rank < split_rows % self.size
        return split_rows // self.size + int(extra)


class ShardLoader:
    """Batches of ``batch_size`` rows from a list of shards, epoch by epoch.

    ``steps`` fixes the batches per epoch; every rank passes the same number (see
    :meth:`lepton_spark.shards.manifest.SplitInfo.steps_per_epoch`). With ``tail="drop"`` an
    epoch ends after ``steps`` batches or when the rows run out (a short last batch is dropped
    when ``drop_last``); with ``tail="pad"`` a rank that runs out starts over on its rows (a new
    shuffled pass) until it has made ``steps`` full batches. Shards are checked against the
    manifest (size, and sha256 when ``verify``) when the loader is made.

    With a ``share``, ``shards`` are all of the split's files and the loader reads this rank's
    dealt rows of them; each rank checksums every ``size``-th file (all ranks check sizes), so
    the ranks together read every byte once, and a mismatch on any rank fails the stage.
    """

    def __init__(
        self,
        folder: str | Path | Location,
        shards: Sequence[ShardInfo],
        *,
        layout: Layout,
        batch_size: int,
        steps: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 65_536,
        drop_last: bool = True,
        tail: Tail = "drop",
        verify: bool = True,
        prefetch: int | None = None,
        pin_memory: bool = False,
        on_verified: Callable[[int], None] | None = None,
        share: Share | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if tail == "pad" and steps is None:
            raise ValueError("tail='pad' needs the number of steps per epoch")
        self.places = []
        for i, shard in enumerate(shards):  # reads every byte when verifying: report as it goes
            mine = share is None or i % share.size == share.rank
            self.places.append(verify_shard(folder, shard, checksum=verify and mine))
            if on_verified is not None:
                on_verified(i)
        self.share = share
        self.index = RowIndex(shards) if share is not None else None
        self.rows = sum(s.rows for s in shards) if share is None else share.rows(self.index.rows)
        if tail == "pad" and steps and not self.rows:
            raise ValueError(f"tail='pad' cannot make {steps} batches from no rows")
        self.layout = layout
        self.batch_size = batch_size
        self.steps = steps
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.tail = tail
        if prefetch is None:  # see the module docstring
            remote = any(not place.is_local for place in self.places)
            prefetch = 2 if pin_memory or remote else 0
        self.prefetch = prefetch
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        if self.tail == "pad":
            assert self.steps is not None
            return self.steps
        full, rest = divmod(self.rows, self.batch_size)
        n = full if self.drop_last or rest == 0 else full + 1
        return n if self.steps is None else min(n, self.steps)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch.

        With ``prefetch`` > 0 a background thread reads, shuffles (and pins, on CUDA) whole chunks
        of rows ``prefetch`` chunks ahead; batches are cut from the chunks as views in the caller's
        thread, so the threads hand over one chunk per many batches, not one batch at a time.
        """
        chunks = self._rows(epoch)
        if self.pin_memory:
            chunks = (c.pinned() for c in chunks)
        if self.prefetch > 0:
            chunks = _prefetched(chunks, self.prefetch)
        return self._batches(chunks)

    def _batches(self, chunks: Iterator[Batch]) -> Iterator[Batch]:
        limit = len(self)
        produced = 0
        pending: deque[Batch] = deque()
        pending_rows = 0
        try:
            for part in chunks:
                pending.append(part)
                pending_rows += len(part)
                while pending_rows >= self.batch_size and produced < limit:
                    yield _pop_rows(pending, self.batch_size)
                    pending_rows -= self.batch_size
                    produced += 1
                if produced == limit:
                    return
            if pending_rows and produced < limit:
                yield _pop_rows(pending, pending_rows)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # stops the prefetch thread (and an endless padded stream)

    def _rows(self, epoch: int) -> Iterator[Batch]:
        """The epoch's rows in order, as record batches or shuffled chunks; passes repeat to pad."""
        if not self.rows:
            return
        passes = 1
        while True:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + epoch) * 1_009 + passes
            )
            if self.share is not None:
                yield from self._dealt(self.share, epoch, passes - 1, generator)
            else:
                yield from self._one_pass(generator) if self.shuffle else self._in_order()
            if self.tail != "pad":
                return
            passes += 1

    def _ranges(self, share: Share, epoch: int, turn: int) -> list[tuple[int, int]]:
        assert self.index is not None
        return rank_ranges(
            self.index.rows,
            share.rank,
            share.size,
            seed=share.seed,
            epoch=0 if share.every_row else epoch,
            shuffle=self.shuffle or share.every_row,
            turn=turn,
            every_row=share.every_row,
        )

    def _dealt(
        self, share: Share, epoch: int, turn: int, generator: torch.Generator
    ) -> Iterator[Batch]:
        """This rank's dealt rows of the epoch: slices of record batches, mixed when shuffling."""
        assert self.index is not None
        parts = self._pieces(self._ranges(share, epoch, turn))
        if not self.shuffle:
            return parts
        return _mixed_pools(parts, self.shuffle_buffer, generator)

    def _pieces(self, ranges: list[tuple[int, int]]) -> Iterator[Batch]:
        """The rows of ``ranges`` in order, as zero-copy slices of record batches."""
        assert self.index is not None
        with closing(_Readers(self.places)) as readers:
            for start, stop in ranges:
                for piece in self.index.pieces(start, stop):
                    rb = readers.get(piece.file).get_batch(piece.batch)
                    yield _to_batch(rb.slice(piece.start, piece.stop - piece.start), self.layout)

    def _in_order(self) -> Iterator[Batch]:
        for place in self.places:
            yield from record_batches(place, self.layout)

    def _one_pass(self, generator: torch.Generator) -> Iterator[Batch]:
        parts = (
            part
            for i in _permutation(len(self.places), generator)
            for part in record_batches(self.places[i], self.layout, generator)
        )
        return _mixed_pools(parts, self.shuffle_buffer, generator)


class _Readers:
    """The shard readers a dealt epoch reads through, opened as its pieces need them.

    A local file's memory map is kept only while pieces of that file come one after another: the
    pages a mapping has touched count in the rank's resident memory until it is unmapped, so maps
    kept open across an epoch of pieces from every file would grow the rank with the split (a
    mapping ends once the tensors over it are gone too). A remote file keeps its reader (opening
    one costs a round trip); its record batches are read into buffers of their own.
    """

    def __init__(self, places: Sequence[Location]) -> None:
        self._places = places
        self._open: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchFileReader]] = {}

    def get(self, file: int) -> pa.ipc.RecordBatchFileReader:
        if file in self._open:
            return self._open[file][1]
        place = self._places[file]
        if place.is_local:
            for other in [i for i in self._open if self._places[i].is_local]:
                self._open.pop(other)[0].close()
        source = place.open_for_reading()
        reader = pa.ipc.open_file(source)
        self._open[file] = (source, reader)
        return reader

    def close(self) -> None:
        for source, _ in self._open.values():
            source.close()
        self._open.clear()


def _permutation(n: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=generator).tolist()


def _mixed_pools(
    parts: Iterator[Batch], buffer_rows: int, generator: torch.Generator
) -> Iterator[Batch]:
    """``parts`` gathered into pools of at least ``buffer_rows`` rows, each in a random order."""
    pool: list[Batch] = []
    pool_rows = 0
    try:
        for part in parts:
            pool.append(part)
            pool_rows += len(part)
            if pool_rows >= buffer_rows:
                yield _mixed(pool, generator)
                pool, pool_rows = [], 0
        if pool:
            yield _mixed(pool, generator)
    finally:
        close = getattr(parts, "close", None)
        if close is not None:
            close()  # a consumer that stops early releases the files the parts hold open


def _mixed(pool: list[Batch], generator: torch.Generator) -> Batch:
    """The pool's rows in a random order (one gather, plus one copy when it spans parts)."""
    merged = _concat(pool)
    return _take(merged, torch.randperm(len(merged), generator=generator))


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

    def hand_over(item: object) -> bool:
        """Queue ``item`` unless the consumer has stopped; whether it was queued."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not hand_over(item):
                    return
            hand_over(_DONE)
        except BaseException as err:  # handed to the consumer
            hand_over(err)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # releases the shards it holds open

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


def loader_files(
    split: SplitInfo, rank: int, size: int, seed: int = 0, every_row: bool = False
) -> tuple[list[ShardInfo], Share | None]:
    """The files rank ``rank`` of ``size`` opens, and its :class:`Share` when the split is dealt
    by row blocks (``None``: these whole shards are its rows)."""
    if split.deal == "blocks":
        return list(split.shards), Share(rank, size, seed, every_row)
    return split.for_rank(rank, size), None


def read_split(folder: str | Path | Location, manifest: Manifest, split: str) -> Iterator[Batch]:
    """A whole split in manifest order, one :class:`Batch` per record batch (on the driver: the
    pictures, the compression report)."""
    layout = Layout.of(manifest.feature_spec)
    for shard in manifest.split(split).shards:
        yield from record_batches(locate(folder).child(shard.path), layout)
