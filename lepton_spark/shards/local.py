"""Shard folders written without Spark: for tests, benchmarks and tools on machines without it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa

from lepton_spark.shards.commit import make_manifest, write_attempt
from lepton_spark.shards.deal import BLOCK_ROWS
from lepton_spark.shards.format import write_shard
from lepton_spark.shards.manifest import Deal, Manifest, SplitInfo
from lepton_spark.shards.storage import Location
from lepton_spark.spec import FeatureSpec


def write_local_shards(
    folder: str | Path | Location,
    splits: Mapping[str, Iterable[pa.Table]],
    spec: FeatureSpec,
    fingerprint: str = "local",
    compression: str = "none",
    deal: Deal = "shards",
) -> Manifest:
    """Write and commit a shard folder from flat tables, one shard each (no Spark).

    ``deal="shards"``: each rank reads whole tables (as ``hash`` shards); ``"blocks"``: the ranks
    are dealt row blocks of all of them, as the Spark writer's ``random`` strategy (record batches
    of :data:`~lepton_spark.shards.deal.BLOCK_ROWS` rows). For tests, benchmarks and tools on
    machines without Spark.
    """

    def write(attempt: str) -> Manifest:
        infos = {
            name: _write_tables(folder, f"{attempt}/{name}", tables, spec, compression, deal)
            for name, tables in splits.items()
        }
        return make_manifest(fingerprint, spec, infos, compression=compression)

    return write_attempt(folder, write)


def _write_tables(
    folder: str | Path | Location,
    prefix: str,
    tables: Iterable[pa.Table],
    spec: FeatureSpec,
    compression: str,
    deal: Deal,
) -> SplitInfo:
    infos = []
    batch_rows = BLOCK_ROWS if deal == "blocks" else None
    for i, table in enumerate(tables):
        name = f"{prefix}/part-{i:05d}.arrow"
        info = write_shard(
            folder, name, table.to_batches(), spec, compression=compression, batch_rows=batch_rows
        )
        if info is not None:
            infos.append(info)
    return SplitInfo(rows=sum(s.rows for s in infos), shards=infos, deal=deal)
