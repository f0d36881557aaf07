"""The shard file format, without Spark: schema, packing, and writing one Arrow IPC file.

A shard is an Arrow IPC *file* (random access, memory-mappable, uncompressed) with the packed layout
the loader reads without copying: ``numeric`` as ``fixed_size_list<float32>[n_numeric]``,
``categorical`` as ``fixed_size_list<int64>[n_categorical]``, ``label`` as ``int64``.
Spark executors write shards through :func:`write_shard`; so can tests and tools on a machine with
no Spark (:func:`write_local_split`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from lepton_spark.manifest import Manifest, ShardInfo, SplitInfo, sha256_file, write_manifest
from lepton_spark.spec import CATEGORICAL_COLUMN, LABEL_COLUMN, NUMERIC_COLUMN, FeatureSpec


def shard_schema(spec: FeatureSpec) -> pa.Schema:
    fields = []
    if spec.numeric:
        fields.append(pa.field(NUMERIC_COLUMN, pa.list_(pa.float32(), len(spec.numeric))))
    if spec.categorical:
        fields.append(pa.field(CATEGORICAL_COLUMN, pa.list_(pa.int64(), len(spec.categorical))))
    fields.append(pa.field(LABEL_COLUMN, pa.int64()))
    return pa.schema(fields)


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
    label = batch.column(spec.label).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    arrays.append(pa.array(label))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_shard(
    folder: str | Path, relpath: str, batches: Iterable[pa.RecordBatch], spec: FeatureSpec
) -> ShardInfo | None:
    """Write flat record batches as one packed shard at ``folder/relpath``.

    Returns its manifest entry, or ``None`` (and no file) when there were no rows.
    """
    schema = shard_schema(spec)
    path = Path(folder) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(pack_batch(batch, spec, schema))
                rows += batch.num_rows
    if rows == 0:
        os.remove(path)
        return None
    return ShardInfo(path=relpath, rows=rows, bytes=path.stat().st_size, sha256=sha256_file(path))


def write_local_split(
    folder: str | Path, split: str, tables: Iterable[pa.Table], spec: FeatureSpec
) -> SplitInfo:
    """Write each flat table as one shard of ``split`` (no Spark): for tests and tools."""
    infos = []
    for i, table in enumerate(tables):
        info = write_shard(folder, f"{split}/part-{i:05d}.arrow", table.to_batches(), spec)
        if info is not None:
            infos.append(info)
    return SplitInfo(rows=sum(s.rows for s in infos), shards=infos)


def make_manifest(fingerprint: str, spec: FeatureSpec, splits: dict[str, SplitInfo]) -> Manifest:
    return Manifest(
        fingerprint=fingerprint,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        feature_spec=spec,
        schema={f.name: str(f.type) for f in shard_schema(spec)},
        splits=splits,
    )


def commit_folder(tmp: Path, final: Path, manifest: Manifest) -> None:
    """Write the manifest last into ``tmp``, then rename ``tmp`` to ``final``.

    An existing ``final`` is replaced only once the new folder is complete.
    """
    write_manifest(tmp, manifest)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def temporary_sibling(final: Path) -> Path:
    """A fresh temporary folder name next to ``final`` (same filesystem, so renames are atomic)."""
    return final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
