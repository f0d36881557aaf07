"""The shard file format and folder layout, without Spark.

A shard is an Arrow IPC *file* (random access, memory-mappable, uncompressed) with the packed layout
the loader reads without copying: ``numeric`` as ``fixed_size_list<float32>[n_numeric]``,
``categorical`` as ``fixed_size_list<int64>[n_categorical]``, ``label`` as ``int64`` (``float32``
for regression), and where the spec has them ``weight`` (``float32``), one
``fixed_size_list<float32>`` per array feature and one ``fixed_size_list<int64>`` per text feature
(see :mod:`lepton_spark.spec`).

A shard folder (local path or ``pyarrow.fs`` URI) holds ``manifest.json`` and one *attempt*
subfolder with the files it lists: ``attempt-<id>/<split>/part-00000.arrow``. Every write goes to a
new attempt; the manifest is written last, atomically, and only then are older attempts removed.
So a folder is either whole (its manifest lists complete files) or has no manifest at all, on any
filesystem, without renaming folders (which object stores cannot do atomically).
Spark executors write shards through :func:`write_shard`; so can tests and tools with no Spark
(:func:`write_local_shards`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lepton_spark.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    SplitInfo,
    read_manifest,
    verify_shard,
    write_manifest,
)
from lepton_spark.spec import (
    CATEGORICAL_COLUMN,
    LABEL_COLUMN,
    NUMERIC_COLUMN,
    WEIGHT_COLUMN,
    FeatureSpec,
)
from lepton_spark.storage import Location, locate

ATTEMPT_PREFIX = "attempt-"

log = logging.getLogger(__name__)


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
) -> ShardInfo | None:
    """Write flat record batches as one packed shard at ``folder/relpath``.

    Returns its manifest entry (with the smallest and largest ``key`` when one is named), or
    ``None`` (and no file) when there were no rows.
    """
    schema = shard_schema(spec)
    place = locate(folder).child(relpath)
    place.fs.create_dir(place.path.rsplit("/", 1)[0], recursive=True)
    rows = 0
    lows, highs = [], []
    with place.fs.open_output_stream(place.path) as sink, pa.ipc.new_file(sink, schema) as out:
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


def new_attempt() -> str:
    """A fresh attempt folder name: sortable by time, unique across concurrent writers."""
    return f"{ATTEMPT_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"


def make_manifest(
    fingerprint: str,
    spec: FeatureSpec,
    splits: dict[str, SplitInfo],
    *,
    strategy: str = "random",
    key: str | None = None,
    source: Mapping[str, Any] | None = None,
    num_workers: int | None = None,
) -> Manifest:
    return Manifest(
        fingerprint=fingerprint,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        feature_spec=spec,
        schema={f.name: str(f.type) for f in shard_schema(spec)},
        strategy=strategy,
        key=key,
        source=dict(source or {}),
        splits=splits,
        skew={n: s.skew(num_workers) for n, s in splits.items() if num_workers and s.shards},
    )


def write_attempt(folder: str | Path | Location, write: Callable[[str], Manifest]) -> Manifest:
    """Fill a new attempt subfolder of ``folder`` and commit it; the one way shards get written.

    ``write(attempt)`` writes the files under ``folder/attempt/`` and returns their manifest,
    which is then written last, atomically. On any failure the attempt is removed and an earlier
    committed content stays as it was; after success, older attempts are removed.
    """
    place = locate(folder)
    attempt = new_attempt()
    try:
        manifest = write(attempt)
        write_manifest(place, manifest)
    except BaseException:
        abandon(place, attempt)
        raise
    remove_older_attempts(place, attempt)
    return manifest


def remove_older_attempts(folder: str | Path | Location, attempt: str) -> None:
    """After a commit: delete attempts older than ``attempt`` (best effort, never newer ones,
    which may be another writer's work in progress)."""
    place = locate(folder)
    for name in place.subfolders():
        if name.startswith(ATTEMPT_PREFIX) and name < attempt:
            try:
                place.child(name).delete_folder()
            except OSError as err:
                log.warning("could not remove the old shard attempt %s: %s", name, err)


def abandon(folder: str | Path | Location, attempt: str) -> None:
    """Remove a failed attempt; remove the folder too when nothing else is in it."""
    place = locate(folder)
    place.child(attempt).delete_folder()
    if place.exists() and not place.subfolders() and not place.child(MANIFEST_NAME).exists():
        place.delete_folder()


def find_committed(folder: str | Path | Location) -> tuple[Manifest | None, str]:
    """The folder's manifest when it is committed; ``None`` and why when nothing is committed.

    A committed folder whose files do not match its manifest (missing, other sizes) raises
    :class:`ShardError` naming the file: damaged data is reported, not silently replaced.
    Checksums are checked by the ranks, which read their own files anyway, before training.
    """
    place = locate(folder)
    if not place.child(MANIFEST_NAME).exists():
        return None, f"no committed shards at {place.uri}"
    try:
        manifest = read_manifest(place)
        for split in manifest.splits.values():
            for shard in split.shards:
                verify_shard(place, shard, checksum=False)
    except ShardError as err:
        raise ShardError(
            f"the committed shards do not match their manifest: {err}; "
            "--rebuild-shards writes them again"
        ) from None
    return manifest, "committed"


def write_local_shards(
    folder: str | Path | Location,
    splits: Mapping[str, Iterable[pa.Table]],
    spec: FeatureSpec,
    fingerprint: str = "local",
) -> Manifest:
    """Write and commit a shard folder from flat tables, one shard each (no Spark).

    For tests, benchmarks and tools on machines without Spark.
    """

    def write(attempt: str) -> Manifest:
        infos = {
            name: _write_tables(folder, f"{attempt}/{name}", tables, spec)
            for name, tables in splits.items()
        }
        return make_manifest(fingerprint, spec, infos)

    return write_attempt(folder, write)


def _write_tables(
    folder: str | Path | Location, prefix: str, tables: Iterable[pa.Table], spec: FeatureSpec
) -> SplitInfo:
    infos = []
    for i, table in enumerate(tables):
        info = write_shard(folder, f"{prefix}/part-{i:05d}.arrow", table.to_batches(), spec)
        if info is not None:
            infos.append(info)
    return SplitInfo(rows=sum(s.rows for s in infos), shards=infos)
