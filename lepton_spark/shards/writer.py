"""Spark DataFrames → Arrow IPC shards written by the executors, plus a manifest.

Each split is cut into ``n`` shards (a multiple of the number of ranks) by one of three strategies
(:class:`~lepton_spark.config.ShardConfig`):

- ``random``: every row gets a seeded random shard such that shard sizes differ by at most one
  row. Rows are numbered globally (per-partition counts, then offsets); each block of ``n``
  consecutive numbers is dealt to the ``n`` shards with a seeded random rotation.
- ``hash``: ``repartition(n, key)``: all rows of a key in one shard; sizes follow the keys.
- ``range``: ``repartitionByRange(n, key)``, sorted by the key within each shard; the manifest
  records each shard's key bounds.

Every executor task writes its partition as one shard file
(:func:`~lepton_spark.shards.format.write_shard`) and returns only its name, rows, size,
checksum and key bounds; the driver writes the manifest last
(:func:`~lepton_spark.shards.commit.write_attempt`). The Spark side of the shards room: the only
module in it that imports pyspark.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lepton_spark.config import ShardConfig
from lepton_spark.shards.commit import make_manifest, write_attempt
from lepton_spark.shards.format import row_bytes, write_shard
from lepton_spark.shards.manifest import Manifest, ShardInfo, SplitInfo
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)

_RESULT_SCHEMA = "path string, rows long, bytes long, sha256 string, key_min string, key_max string"
_SHARD_KEY = "_lepton_shard_key"


def _writer(
    folder: Location, prefix: str, spec: FeatureSpec, key: str | None, compression: str = "none"
):
    """The mapInArrow function: write this task's partition as one shard file."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx is not None else 0
        # The task attempt in the name: a speculative or retried copy never overwrites the file
        # whose size and checksum the driver records.
        tries = ctx.attemptNumber() if ctx is not None else 0
        name = f"{prefix}/part-{part:05d}-{tries}.arrow"
        info = write_shard(folder, name, batches, spec, key, compression)
        if info is not None:
            row = info.model_dump()
            # Key bounds travel as JSON text: one result schema whatever the key's type.
            # (dates, timestamps and decimals as their text)
            row["key_min"] = json.dumps(info.key_min, default=str)
            row["key_max"] = json.dumps(info.key_max, default=str)
            yield pa.RecordBatch.from_pylist([row])

    return write


def num_shards(rows: int, num_workers: int, rows_per_shard: int) -> int:
    """Enough shards for ``rows_per_shard``, rounded up to a multiple of the number of ranks."""
    wanted = max(1, math.ceil(rows / rows_per_shard))
    return math.ceil(wanted / num_workers) * num_workers


_KEYS: dict[int, list[int]] = {}


def _partition_keys(spark: SparkSession, n: int) -> list[int]:
    """For each ``k < n`` a long whose Spark hash partition among ``n`` is ``k``.

    ``repartition(n, col)`` places a row in ``pmod(hash(col), n)``; giving shard ``k`` the key
    found here puts exactly shard ``k``'s rows in partition ``k``. Spark's hash is fixed (Murmur3,
    seed 42), so the answer for ``n`` is remembered.
    """
    if n in _KEYS:
        return _KEYS[n]
    rows = (
        spark.range(0, 64 * n + 1024)
        .select("id", F.expr(f"pmod(hash(id), {n})").alias("p"))
        .groupBy("p")
        .agg(F.min("id").alias("id"))
        .collect()
    )
    keys = {int(r["p"]): int(r["id"]) for r in rows}
    missing = [k for k in range(n) if k not in keys]
    if missing:  # cannot happen for any sane n; a loud failure beats silent imbalance
        raise RuntimeError(f"no hash key found for partitions {missing[:5]} of {n}")
    _KEYS[n] = [keys[k] for k in range(n)]
    return _KEYS[n]


def _random_partitions(df: DataFrame, n: int, seed: int) -> DataFrame:
    """``df`` in ``n`` partitions of seeded random rows, sizes within one row of each other.

    Rows are numbered globally (``g``: the partition's offset from a count per partition, plus
    the position within it); each block of ``n`` consecutive numbers is dealt to the ``n`` shards
    rotated by a seeded hash of the block, so every shard gets exactly one row per block, at a
    random position. All in Spark SQL: the rows do not pass through Python before the writer.
    """
    counts = {
        int(r["p"]): int(r["count"])
        for r in df.groupBy(F.spark_partition_id().alias("p")).count().collect()
    }
    offsets, total = [], 0
    for p in range(max(counts, default=-1) + 1):
        offsets.append(total)
        total += counts.get(p, 0)
    if not offsets:
        return df.repartition(n)
    keys = _partition_keys(df.sparkSession, n)
    position = F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))
    offset = F.element_at(F.array(*[F.lit(o) for o in offsets]), F.spark_partition_id() + 1)
    g = offset + position
    rotation = F.pmod(F.xxhash64(F.lit(seed), F.floor(g / n)), F.lit(n))
    shard = F.pmod(g + rotation, F.lit(n))
    # Long, as the keys were found for: Spark hashes an int and a long of one value differently.
    key = F.element_at(F.array(*[F.lit(k) for k in keys]), (shard + 1).cast("int")).cast("long")
    # Within a shard, rows come in runs in their input order (randomSplit sorts partitions by
    # value): a seeded hash of the row number puts them in a random order instead.
    order = "_lepton_shard_order"
    return (
        df.withColumn(_SHARD_KEY, key)
        .withColumn(order, F.xxhash64(F.lit(seed + 1), g))
        .repartition(n, _SHARD_KEY)
        .sortWithinPartitions(order)
        .drop(order)
    )


def partition_for_shards(df: DataFrame, n: int, cfg: ShardConfig) -> DataFrame:
    """``df`` repartitioned so that each of its ``n`` partitions is one shard."""
    if cfg.strategy == "hash":
        return df.repartition(n, F.col(str(cfg.key)))
    if cfg.strategy == "range":
        return df.repartitionByRange(n, F.col(str(cfg.key))).sortWithinPartitions(str(cfg.key))
    return _random_partitions(df, n, cfg.seed)


def write_split(
    df: DataFrame,
    folder: Location,
    prefix: str,
    spec: FeatureSpec,
    shards: int,
    cfg: ShardConfig,
) -> SplitInfo:
    """Write one split as up to ``shards`` files under ``folder/prefix/`` (empty ones skipped)."""
    key = cfg.key if cfg.strategy == "range" else None
    # The random strategy reads the split twice (row counts, then the rows): compute it once.
    cached = df.persist(StorageLevel.MEMORY_AND_DISK) if cfg.strategy == "random" else df
    try:
        parts = partition_for_shards(cached, shards, cfg)
        writer = _writer(folder, prefix, spec, key, cfg.compression)
        result = parts.mapInArrow(writer, _RESULT_SCHEMA).collect()
    finally:
        if cached is not df:
            cached.unpersist()
    infos = []
    for r in result:
        row = r.asDict()
        row["key_min"], row["key_max"] = json.loads(row["key_min"]), json.loads(row["key_max"])
        infos.append(ShardInfo(**row))
    infos.sort(key=lambda s: s.path)
    return SplitInfo(rows=sum(s.rows for s in infos), shards=infos)


@dataclass(frozen=True)
class ShardSet:
    """A committed shard folder, and whether this run wrote it or found it."""

    folder: str
    manifest: Manifest
    reused: bool = False


def write_shards(
    splits: Mapping[str, DataFrame],
    spec: FeatureSpec,
    folder: str | Location,
    cfg: ShardConfig,
    *,
    num_workers: int,
    estimated_rows: Mapping[str, int],
    fingerprint: str,
    source: Mapping[str, Any] | None = None,
) -> ShardSet:
    """Write every split into ``folder`` and commit it (see :mod:`lepton_spark.shards.commit`).

    The files go to a new attempt subfolder; the manifest is written last. A failure removes the
    attempt and leaves an earlier committed content of ``folder`` as it was.
    """
    place = locate(folder)
    target_rows = cfg.target_rows(row_bytes(spec))

    def write(attempt: str) -> Manifest:
        infos = {}
        for name, df in splits.items():
            n = num_shards(estimated_rows[name], num_workers, target_rows)
            infos[name] = write_split(df, place, f"{attempt}/{name}", spec, n, cfg)
            log.info(
                "wrote %s: %d rows in %d shards", name, infos[name].rows, len(infos[name].shards)
            )
        return make_manifest(
            fingerprint,
            spec,
            infos,
            strategy=cfg.strategy,
            key=cfg.key,
            source=source,
            num_workers=num_workers,
            compression=cfg.compression,
        )

    return ShardSet(folder=place.uri, manifest=write_attempt(place, write))
