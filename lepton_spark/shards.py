"""Spark DataFrames → Arrow IPC shards written by the executors, plus a manifest.

Each split is repartitioned into ``n`` row-balanced partitions (a multiple of the number of ranks),
and every executor task writes its partition as one Arrow IPC file with the layout the loader reads
without copying: ``numeric`` as ``fixed_size_list<float32>[n_numeric]``, ``categorical`` as
``fixed_size_list<int64>[n_categorical]``, ``label`` as ``int64``. Tasks return only the file's
name, row count, size and sha256; the driver writes ``manifest.json`` last and renames the whole
folder into place, so a folder with a manifest is never half-written.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyspark.sql import DataFrame

from lepton_spark.manifest import Manifest, ShardInfo, SplitInfo, read_manifest
from lepton_spark.shardio import commit_folder, make_manifest, temporary_sibling, write_shard
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)

_RESULT_SCHEMA = "path string, rows long, bytes long, sha256 string"


def _writer(folder: str, split: str, spec: FeatureSpec):
    """The mapInArrow function: write this task's partition as one shard file."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx is not None else 0
        info = write_shard(folder, f"{split}/part-{part:05d}.arrow", batches, spec)
        if info is not None:
            yield pa.RecordBatch.from_pylist([info.model_dump()])

    return write


def num_shards(rows: int, num_workers: int, rows_per_shard: int) -> int:
    """Enough shards for ``rows_per_shard``, rounded up to a multiple of the number of ranks."""
    wanted = max(1, math.ceil(rows / rows_per_shard))
    return math.ceil(wanted / num_workers) * num_workers


def write_split(
    df: DataFrame, folder: str, split: str, spec: FeatureSpec, shards: int
) -> SplitInfo:
    """Write one split as ``shards`` balanced files under ``folder/split/``."""
    result = (
        df.repartition(shards).mapInArrow(_writer(folder, split, spec), _RESULT_SCHEMA).collect()
    )
    infos = sorted((ShardInfo(**r.asDict()) for r in result), key=lambda s: s.path)
    return SplitInfo(rows=sum(s.rows for s in infos), shards=infos)


@dataclass(frozen=True)
class ShardSet:
    folder: Path
    manifest: Manifest


def write_shards(
    splits: dict[str, DataFrame],
    spec: FeatureSpec,
    root: str | Path,
    fingerprint: str,
    num_workers: int,
    rows_per_shard: int,
    estimated_rows: dict[str, int],
) -> ShardSet:
    """Write every split into ``root/fingerprint`` and commit it atomically.

    The files go to a temporary sibling folder first; the manifest is written last, and the folder
    is renamed into place only then. A failure removes the temporary folder; an earlier committed
    folder under the same name is replaced only by a complete new one.
    """
    final = Path(root).resolve() / fingerprint
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        infos = {}
        for name, df in splits.items():
            shards = num_shards(estimated_rows[name], num_workers, rows_per_shard)
            infos[name] = write_split(df, str(tmp), name, spec, shards)
            log.info("wrote %s: %d rows in %d shards", name, infos[name].rows, shards)
        commit_folder(tmp, final, make_manifest(fingerprint, spec, infos))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardSet(folder=final, manifest=read_manifest(final))
