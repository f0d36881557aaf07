"""Spark DataFrames → Arrow IPC shards written by the executors, plus a manifest.

How a split becomes files depends on the strategy (:class:`~lepton_spark.config.ShardConfig`):

- ``random`` (the default): **no exchange**. Every Spark partition of the split is written where
  it is, in one pass: its Arrow batches packed, each batch's rows in a seeded random order, cut
  into record batches of :data:`~lepton_spark.shards.deal.BLOCK_ROWS` rows, rolled over to a new
  file every ``target_rows`` rows. Balance and the shuffle across partitions are the reader's
  (:mod:`lepton_spark.shards.deal`: a fresh seeded deal of row blocks to the ranks every epoch,
  equal rows on every rank), so files may differ in size.
- ``hash``: ``repartition(n, key)``: all rows of a key in one shard, whole shards per rank.
- ``range``: ``repartitionByRange(n, key)``, sorted by the key within each shard; the manifest
  records each shard's key bounds.

Every executor task returns only its files' names, rows, record batches, size, checksum and key
bounds; the driver writes the manifest last (:func:`~lepton_spark.shards.commit.write_attempt`).
The split is read once and never persisted here. The Spark side of the shards room: the only
module in it that imports pyspark.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lepton_spark.config import ShardConfig
from lepton_spark.shards.commit import make_manifest, write_attempt
from lepton_spark.shards.deal import BLOCK_ROWS
from lepton_spark.shards.format import row_bytes, write_files
from lepton_spark.shards.manifest import Manifest, ShardInfo, SplitInfo
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)

_RESULT_SCHEMA = (
    "path string, rows long, bytes long, sha256 string, key_min string, key_max string, "
    "batches string, seconds string"
)


def _writer(
    folder: Location,
    prefix: str,
    spec: FeatureSpec,
    cfg: ShardConfig,
    max_rows: int,
):
    """The mapInArrow function: write this task's partition as shard file(s), in one pass."""
    key = cfg.key if cfg.strategy == "range" else None
    spread = cfg.strategy == "random"

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        started = time.perf_counter()
        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx is not None else 0
        # The task attempt in the name: a speculative or retried copy never overwrites the file
        # whose size and checksum the driver records.
        tries = ctx.attemptNumber() if ctx is not None else 0
        clock: dict[str, float] = {}
        infos = write_files(
            folder,
            lambda k: f"{prefix}/part-{part:05d}-{tries}-{k:05d}.arrow",
            batches,
            spec,
            max_rows=max_rows,
            key=key,
            compression=cfg.compression,
            batch_rows=BLOCK_ROWS if spread else None,
            permute=np.random.default_rng([cfg.seed % (1 << 63), part]) if spread else None,
            clock=clock,
        )
        # Waiting for rows (Spark computing the split and sending it) is what the rest is not;
        # the wait for the first batch comes before any file is open.
        clock["input"] = (
            time.perf_counter() - started - sum(v for k, v in clock.items() if k != "input")
        )
        rows = []
        for info in infos:
            row = info.model_dump()
            # Key bounds travel as JSON text: one result schema whatever the key's type.
            # (dates, timestamps and decimals as their text)
            row["key_min"] = json.dumps(info.key_min, default=str)
            row["key_max"] = json.dumps(info.key_max, default=str)
            row["batches"] = json.dumps(list(info.batches))
            row["seconds"] = json.dumps(clock if not rows else {})  # the task's, on its first
            rows.append(row)
        if rows:
            yield pa.RecordBatch.from_pylist(rows)

    return write


def num_shards(rows: int, num_workers: int, rows_per_shard: int) -> int:
    """Enough shards for ``rows_per_shard``, rounded up to a multiple of the number of ranks."""
    wanted = max(1, math.ceil(rows / rows_per_shard))
    return math.ceil(wanted / num_workers) * num_workers


def partition_for_shards(df: DataFrame, n: int, cfg: ShardConfig) -> DataFrame:
    """``df`` as the partitions to write: as it is (``random``), or exchanged so that each of
    ``n`` partitions is one shard (``hash``, ``range``)."""
    if cfg.strategy == "hash":
        return df.repartition(n, F.col(str(cfg.key)))
    if cfg.strategy == "range":
        return df.repartitionByRange(n, F.col(str(cfg.key))).sortWithinPartitions(str(cfg.key))
    return df


def write_split(
    df: DataFrame,
    folder: Location,
    prefix: str,
    spec: FeatureSpec,
    shards: int,
    cfg: ShardConfig,
    clock: dict[str, float] | None = None,
) -> SplitInfo:
    """Write one split under ``folder/prefix/``: its partitions as they are (``random``, files of
    at most ``target_rows`` rows), or ``shards`` exchanged partitions (``hash``, ``range``).
    ``clock`` gets the executors' seconds by stage, summed over tasks (see
    :func:`~lepton_spark.shards.format.write_shard`)."""
    spread = cfg.strategy == "random"
    max_rows = cfg.target_rows(row_bytes(spec)) if spread else 1 << 62
    parts = partition_for_shards(df, shards, cfg)
    result = parts.mapInArrow(_writer(folder, prefix, spec, cfg, max_rows), _RESULT_SCHEMA)
    infos = []
    for r in result.collect():
        row = r.asDict()
        row["key_min"], row["key_max"] = json.loads(row["key_min"]), json.loads(row["key_max"])
        row["batches"] = tuple(json.loads(row["batches"]))
        for stage, seconds in json.loads(row.pop("seconds")).items():
            if clock is not None:
                clock[stage] = clock.get(stage, 0.0) + seconds
        infos.append(ShardInfo(**row))
    infos.sort(key=lambda s: s.path)
    return SplitInfo(
        rows=sum(s.rows for s in infos), shards=infos, deal="blocks" if spread else "shards"
    )


@dataclass(frozen=True)
class ShardSet:
    """A committed shard folder, and whether this run wrote it or found it."""

    folder: str
    manifest: Manifest
    reused: bool = False
    # Executor seconds by stage (input, pack, permute, write), over all tasks.
    task_seconds: dict[str, float] = field(default_factory=dict)


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
    spread = cfg.strategy == "random"

    clock: dict[str, float] = {}

    def write(attempt: str) -> Manifest:
        infos = {}
        for name, df in splits.items():
            # hash and range: a number of shards to exchange into; random writes what it finds.
            n = 0 if spread else num_shards(estimated_rows[name], num_workers, target_rows)
            started = time.perf_counter()
            infos[name] = write_split(df, place, f"{attempt}/{name}", spec, n, cfg, clock)
            took = time.perf_counter() - started
            how = (
                "its partitions as they were, in one pass (no exchange)"
                if spread
                else f"{n} {cfg.strategy} partitions (one exchange)"
            )
            log.info(
                "wrote %s: %d rows in %d files from %s in %.1f s; the split was read once, "
                "not persisted",
                name,
                infos[name].rows,
                len(infos[name].shards),
                how,
                took,
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

    manifest = write_attempt(place, write)
    log.info(
        "shard writing, executor seconds over all tasks: %s",
        ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in clock.items()),
    )
    return ShardSet(folder=place.uri, manifest=manifest, task_seconds=clock)
