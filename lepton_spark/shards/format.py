"""The shard file format: an Arrow IPC file with a packed, fixed-width layout. No Spark.

A shard is an Arrow IPC *file* (random access, memory-mappable; its buffers compressed only when
``shards.compression`` asks) with the packed layout
the loader reads without copying: ``numeric`` as ``fixed_size_list<float32>[n_numeric]``,
``categorical`` as ``fixed_size_list<int64>[n_categorical]``, ``label`` as ``int64`` (``float32``
for regression), and where the spec has them ``weight`` (``float32``), one
``fixed_size_list<float32>`` per array feature and one ``fixed_size_list<int64>`` per text feature
(see :mod:`lepton_spark.spec`). Spark executors write shards through :func:`write_files`
(:mod:`lepton_spark.shards.writer`); so do tools with no Spark (:mod:`lepton_spark.shards.local`).
The manifest lists every file's record batches (their rows): readers deal row blocks by them
(:mod:`lepton_spark.shards.deal`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lepton_spark.errors import ShardError
from lepton_spark.shards.manifest import ShardInfo
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import (
    CATEGORICAL_COLUMN,
    LABEL_COLUMN,
    NUMERIC_COLUMN,
    WEIGHT_COLUMN,
    FeatureSpec,
)


def _label_type(spec: FeatureSpec) -> pa.DataType:
    return pa.float32() if spec.task == "regression" else pa.int64()


def shard_schema(spec: FeatureSpec) -> pa.Schema:
    fields = []
    if spec.numeric:
        fields.append(pa.field(NUMERIC_COLUMN, pa.list_(pa.float32(), len(spec.numeric))))
    if spec.categorical:
        fields.append(pa.field(CATEGORICAL_COLUMN, pa.list_(pa.int64(), len(spec.categorical))))
    fields.append(pa.field(LABEL_COLUMN, _label_type(spec)))
    if spec.weight is not None:
        fields.append(pa.field(WEIGHT_COLUMN, pa.float32()))
    for a in spec.arrays:
        fields.append(pa.field(a.column, pa.list_(pa.float32(), a.length)))
    for t in spec.texts:
        fields.append(pa.field(t.column, pa.list_(pa.int64(), t.max_length)))
    return pa.schema(fields)


def row_bytes(spec: FeatureSpec) -> int:
    """Bytes one row takes in a shard (the layout is fixed-width)."""
    return (
        4 * len(spec.numeric)
        + 8 * len(spec.categorical)
        + 8
        + (4 if spec.weight is not None else 0)
        + sum(4 * a.length for a in spec.arrays)
        + sum(8 * t.max_length for t in spec.texts)
    )


def _fixed_rows(column: pa.Array, width: int, dtype: Any, name: str) -> pa.Array:
    """A list column whose rows all have ``width`` values → ``fixed_size_list<dtype>[width]``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        values = column.flatten()
    else:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != width or lengths.max() != width):
            raise ShardError(
                f"column {name!r}: rows of {lengths.min()}..{lengths.max()} values, "
                f"expected {width}"
            )
        values = column.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def pack_batch(batch: pa.RecordBatch, spec: FeatureSpec, schema: pa.Schema) -> pa.RecordBatch:
    """Flat feature columns (as Spark gives them) → the packed shard layout (one copy)."""
    arrays: list[pa.Array] = []
    for names, dtype in ((spec.numeric, np.float32), (spec.categorical_names, np.int64)):
        if not names:
            continue
        matrix = np.empty((batch.num_rows, len(names)), dtype=dtype)
        for j, name in enumerate(names):
            matrix[:, j] = batch.column(name).to_numpy(zero_copy_only=False)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), len(names)))
    if spec.label is None:  # clustering: no label, zeros keep the layout the same
        arrays.append(pa.array(np.zeros(batch.num_rows, dtype=np.int64)))
    else:
        dtype = np.float32 if spec.task == "regression" else np.int64
        label = batch.column(spec.label).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        arrays.append(pa.array(label))
    if spec.weight is not None:
        weight = batch.column(spec.weight).to_numpy(zero_copy_only=False)
        arrays.append(pa.array(weight.astype(np.float32, copy=False)))
    for a in spec.arrays:
        arrays.append(_fixed_rows(batch.column(a.name), a.length, np.float32, a.name))
    for t in spec.texts:
        arrays.append(_fixed_rows(batch.column(t.name), t.max_length, np.int64, t.name))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_shard(
    folder: str | Path | Location,
    relpath: str,
    batches: Iterable[pa.RecordBatch],
    spec: FeatureSpec,
    key: str | None = None,
    compression: str = "none",
    *,
    batch_rows: int | None = None,
    permute: np.random.Generator | None = None,
    clock: dict[str, float] | None = None,
) -> ShardInfo | None:
    """Write flat record batches as one packed shard at ``folder/relpath``, its buffers
    compressed with ``compression`` (``none``, ``lz4`` or ``zstd``: readers need no flag).

    ``batch_rows`` cuts the file's record batches to at most that many rows (each incoming batch
    is cut on its own: no copy); ``permute`` puts each incoming batch's rows in a random order
    first (one gather). Returns its manifest entry (with the rows of each record batch, and the
    smallest and largest ``key`` when one is named), or ``None`` (and no file) when there were
    no rows. ``clock`` gets the seconds spent waiting for the input (``input``: on Spark, the
    rows computed and sent to Python), ``pack``, ``permute`` and ``write`` (with the sha256 of
    the bytes as they are written).
    """
    clock = {} if clock is None else clock
    tick = time.perf_counter

    def spent(stage: str, since: float) -> float:
        now = tick()
        clock[stage] = clock.get(stage, 0.0) + now - since
        return now

    schema = shard_schema(spec)
    place = locate(folder).child(relpath)
    place.fs.create_dir(place.path.rsplit("/", 1)[0], recursive=True)
    counts: list[int] = []
    lows, highs = [], []
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    # The checksum as the bytes go out (no second read of the file).
    with place.fs.open_output_stream(place.path) as stream:
        sink = _Hashed(stream)
        with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), schema, options=options) as out:
            now = tick()
            for batch in batches:
                now = spent("input", now)
                if not batch.num_rows:
                    continue
                packed = pack_batch(batch, spec, schema)
                now = spent("pack", now)
                if permute is not None:
                    packed = packed.take(pa.array(permute.permutation(packed.num_rows)))
                    now = spent("permute", now)
                step = batch_rows or packed.num_rows
                for start in range(0, packed.num_rows, step):
                    piece = packed.slice(start, step)
                    out.write_batch(piece)
                    counts.append(piece.num_rows)
                if key is not None:
                    bounds = pc.min_max(batch.column(key))
                    lows.append(bounds["min"].as_py())
                    highs.append(bounds["max"].as_py())
                now = spent("write", now)
    if not counts:
        place.fs.delete_file(place.path)
        return None
    return ShardInfo(
        path=relpath,
        rows=sum(counts),
        bytes=sink.size,
        sha256=sink.hexdigest(),
        key_min=_bound(min, lows),
        key_max=_bound(max, highs),
        batches=tuple(counts),
    )


class _Hashed:
    """A write-only file that hashes (sha256) and counts what goes through it to ``out``."""

    def __init__(self, out: pa.NativeFile) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._out.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._out.flush()

    def tell(self) -> int:
        return self.size

    def close(self) -> None:  # the stream is closed by its own ``with``
        self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Stream:
    """Record batches taken ``n`` rows at a time (a batch that crosses the line is sliced)."""

    def __init__(self, batches: Iterable[pa.RecordBatch]) -> None:
        self._batches = iter(batches)
        self._head: pa.RecordBatch | None = None

    def more(self) -> bool:
        while self._head is None or not self._head.num_rows:
            self._head = next(self._batches, None)
            if self._head is None:
                return False
        return True

    def take(self, n: int) -> Iterator[pa.RecordBatch]:
        while n > 0 and self.more():
            head = self._head
            assert head is not None
            if head.num_rows <= n:
                self._head = None
                n -= head.num_rows
                yield head
            else:
                yield head.slice(0, n)
                self._head = head.slice(n)
                n = 0


def write_files(
    folder: str | Path | Location,
    name: Callable[[int], str],
    batches: Iterable[pa.RecordBatch],
    spec: FeatureSpec,
    *,
    max_rows: int,
    key: str | None = None,
    compression: str = "none",
    batch_rows: int | None = None,
    permute: np.random.Generator | None = None,
    clock: dict[str, float] | None = None,
) -> list[ShardInfo]:
    """One pass over ``batches``: shard files of at most ``max_rows`` rows each, the ``k``-th at
    ``folder/name(k)`` (see :func:`write_shard` for the rest)."""
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    stream = _Stream(batches)
    infos = []
    k = 0
    while stream.more():
        info = write_shard(
            folder,
            name(k),
            stream.take(max_rows),
            spec,
            key,
            compression,
            batch_rows=batch_rows,
            permute=permute,
            clock=clock,
        )
        if info is not None:
            infos.append(info)
        k += 1
    return infos


def _bound(pick: Any, values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return pick(present) if present else None
