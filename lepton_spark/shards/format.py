"""The shard file format: an Arrow IPC file with a packed, fixed-width layout. No Spark.

A shard is an Arrow IPC *file* (random access, memory-mappable, uncompressed) with the packed layout
the loader reads without copying: ``numeric`` as ``fixed_size_list<float32>[n_numeric]``,
``categorical`` as ``fixed_size_list<int64>[n_categorical]``, ``label`` as ``int64`` (``float32``
for regression), and where the spec has them ``weight`` (``float32``), one
``fixed_size_list<float32>`` per array feature and one ``fixed_size_list<int64>`` per text feature
(see :mod:`lepton_spark.spec`). Spark executors write shards through :func:`write_shard`
(:mod:`lepton_spark.shards.writer`); so do tools with no Spark (:mod:`lepton_spark.shards.local`).
"""

from __future__ import annotations

from collections.abc import Iterable
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
) -> ShardInfo | None:
    """Write flat record batches as one packed shard at ``folder/relpath``, its buffers
    compressed with ``compression`` (``none``, ``lz4`` or ``zstd``: readers need no flag).

    Returns its manifest entry (with the smallest and largest ``key`` when one is named), or
    ``None`` (and no file) when there were no rows.
    """
    schema = shard_schema(spec)
    place = locate(folder).child(relpath)
    place.fs.create_dir(place.path.rsplit("/", 1)[0], recursive=True)
    rows = 0
    lows, highs = [], []
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    with (
        place.fs.open_output_stream(place.path) as sink,
        pa.ipc.new_file(sink, schema, options=options) as out,
    ):
        for batch in batches:
            if not batch.num_rows:
                continue
            out.write_batch(pack_batch(batch, spec, schema))
            rows += batch.num_rows
            if key is not None:
                bounds = pc.min_max(batch.column(key))
                lows.append(bounds["min"].as_py())
                highs.append(bounds["max"].as_py())
    if rows == 0:
        place.fs.delete_file(place.path)
        return None
    return ShardInfo(
        path=relpath,
        rows=rows,
        bytes=place.size(),
        sha256=place.sha256(),
        key_min=_bound(min, lows),
        key_max=_bound(max, highs),
    )


def _bound(pick: Any, values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return pick(present) if present else None
