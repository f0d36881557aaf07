"""The shard manifest: what a committed shard folder holds, and which shards each rank reads.

``manifest.json`` is written last, atomically (:mod:`lepton_spark.shards.commit`), so a folder
with a manifest is always whole. It lists every split's files with their rows, bytes and sha256,
the feature spec, the shard schema and what the dataset fingerprint was computed from. No Spark,
no MLflow: ranks read it.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lepton_spark.errors import ShardError
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: whole shards dealt to ranks, no record batch counts

Deal = Literal["shards", "blocks"]

Tail = Literal["drop", "pad"]
KeyValue = int | float | str | None


class ShardInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str = Field(description="relative to the shard folder")
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    key_min: KeyValue = Field(None, description="range strategy: the smallest key in the shard")
    key_max: KeyValue = None
    batches: tuple[int, ...] = Field(
        (), description="rows of each record batch, in file order (empty in format 2)"
    )


class SkewReport(BaseModel):
    """How evenly a split's rows are spread over shards and over ``ranks`` ranks."""

    model_config = ConfigDict(frozen=True)

    ranks: int
    rows_per_shard: list[int]
    rows_per_rank: list[int]
    shard_max_over_mean: float
    rank_max_over_mean: float


class SplitInfo(BaseModel):
    """One split's files, and how its rows are dealt to the ranks.

    ``deal="blocks"`` (the ``random`` strategy): every rank reads ``rows // size`` rows, a seeded
    selection of row blocks from all files, new every epoch (:mod:`lepton_spark.shards.deal`).
    ``deal="shards"`` (``hash``, ``range``, format 2, shards written without Spark): whole files
    per rank, balanced by rows (:meth:`assignment`), so a key's rows stay on one rank.
    """

    model_config = ConfigDict(frozen=True)

    rows: int
    shards: list[ShardInfo]
    deal: Deal = "shards"

    def assignment(self, size: int) -> list[list[ShardInfo]]:
        """Whole shards per rank, balancing rows: largest first to the rank with fewest rows.

        Deterministic (ties go to the lower path and the lower rank); with equal shards it deals
        them out in turn. Together the ranks cover every shard exactly once.
        """
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        ranks: list[list[ShardInfo]] = [[] for _ in range(size)]
        load = [(0, r) for r in range(size)]
        for shard in sorted(self.shards, key=lambda s: (-s.rows, s.path)):
            rows, r = heapq.heappop(load)
            ranks[r].append(shard)
            heapq.heappush(load, (rows + shard.rows, r))
        return [sorted(shards, key=lambda s: s.path) for shards in ranks]

    def for_rank(self, rank: int, size: int) -> list[ShardInfo]:
        """The shards rank ``rank`` of ``size`` reads (see :meth:`assignment`)."""
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside [0, {size})")
        return self.assignment(size)[rank]

    def rows_per_rank(self, size: int) -> list[int]:
        """Training rows per rank and epoch (``blocks``: the global remainder is left out)."""
        if self.deal == "blocks":
            return [self.rows // size] * size
        return [sum(s.rows for s in shards) for shards in self.assignment(size)]

    def training_problem(self, size: int, batch_size: int, tail: Tail = "drop") -> str | None:
        """Why ``size`` ranks cannot each run a full step on this split (``None``: they can)."""
        rows_per_rank = self.rows_per_rank(size)
        if self.rows < size or min(rows_per_rank) == 0:
            return (
                f"{self.rows} training rows for train.num_workers={size} ranks: every rank needs "
                f"rows (rows per rank: {rows_per_rank}); lower train.num_workers or add data"
            )
        if self.steps_per_epoch(size, batch_size, tail) == 0:
            return (
                f"no full step: rows per rank {rows_per_rank} with train.batch_size={batch_size} "
                "(train.tail: drop); lower train.batch_size or set train.tail: pad"
            )
        return None

    def steps_per_epoch(self, size: int, batch_size: int, tail: Tail = "drop") -> int:
        """Steps every rank runs per epoch, the same on every rank so no allreduce waits.

        ``drop``: the smallest rank's full batches (larger ranks leave rows out each epoch, a
        different part every epoch when shuffling). ``pad``: the largest rank's batches, rounded
        up; smaller ranks wrap around and see some rows twice.
        """
        rows = self.rows_per_rank(size)
        if tail == "pad":
            return math.ceil(max(rows) / batch_size)
        return min(rows) // batch_size

    def skew(self, size: int) -> SkewReport:
        per_shard = [s.rows for s in self.shards]
        per_rank = self.rows_per_rank(size)

        def ratio(values: list[int]) -> float:
            mean = sum(values) / len(values) if values else 0.0
            return round(max(values) / mean, 4) if mean else 1.0

        return SkewReport(
            ranks=size,
            rows_per_shard=per_shard,
            rows_per_rank=per_rank,
            shard_max_over_mean=ratio(per_shard),
            rank_max_over_mean=ratio(per_rank),
        )


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    fingerprint: str
    created_at: str
    feature_spec: FeatureSpec
    schema_: dict[str, str] = Field(alias="schema")
    strategy: str = "random"
    key: str | None = None
    compression: str = "none"  # of the files' buffers (Arrow IPC); readers need not know it
    source: dict[str, object] = Field(
        default_factory=dict, description="what the fingerprint was computed from"
    )
    splits: dict[str, SplitInfo]
    skew: dict[str, SkewReport] = Field(
        default_factory=dict, description="per split, for the number of ranks written for"
    )

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise ShardError(
                f"manifest has no split {name!r} (has {sorted(self.splits)})"
            ) from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)


def read_manifest(folder: str | Path | Location) -> Manifest:
    place = locate(folder).child(MANIFEST_NAME)
    if not place.is_file():
        raise ShardError(f"{place.uri}: no manifest, so {folder} is not a committed shard folder")
    try:
        manifest = Manifest.model_validate_json(place.read_text())
    except ValueError as err:
        raise ShardError(f"{place.uri}: unreadable manifest: {err}") from None
    if manifest.format_version not in READABLE_VERSIONS:
        raise ShardError(
            f"{place.uri}: shard format {manifest.format_version}, this version reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the shards (--rebuild-shards)"
        )
    if manifest.format_version < FORMAT_VERSION and not _OLD_SEEN.get(place.uri):
        _OLD_SEEN[place.uri] = True
        log.info(
            "%s: shard format %d, read as written (whole shards per rank, the same rows every "
            "epoch); a new run writes format %d (a fresh deal of row blocks every epoch)",
            place.uri,
            manifest.format_version,
            FORMAT_VERSION,
        )
    return manifest


_OLD_SEEN: dict[str, bool] = {}


def sha256_file(path: str | Path | Location) -> str:
    return locate(path).sha256()


def verify_shard(
    folder: str | Path | Location, shard: ShardInfo, checksum: bool = True
) -> Location:
    """Where the shard is, once its size (and checksum) match the manifest."""
    place = locate(folder).child(shard.path)
    if not place.is_file():
        raise ShardError(f"{place.uri}: listed in the manifest but missing")
    size = place.size()
    if size != shard.bytes:
        raise ShardError(f"{place.uri}: {size} bytes on disk, the manifest says {shard.bytes}")
    if checksum and (digest := place.sha256()) != shard.sha256:
        raise ShardError(f"{place.uri}: sha256 {digest[:12]}… does not match the manifest")
    return place


def write_manifest(folder: str | Path | Location, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically: readers see no manifest or a whole one. On a local
    disk it is this user's only (0600), as the data it describes."""
    target = locate(folder).child(MANIFEST_NAME)
    target.write_text_atomic(manifest.to_json())
    if target.is_local:
        os.chmod(target.path, 0o600)
