"""The shard manifest: what a committed shard folder holds, and which shards each rank reads.

``manifest.json`` is written last, inside a temporary folder that is then renamed into place, so a
folder with a manifest is always whole. No Spark, no MLflow: ranks read it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lepton_spark.spec import FeatureSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard folder is missing, incomplete or does not match its manifest."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str = Field(description="relative to the shard folder")
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SplitInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: int
    shards: list[ShardInfo]

    def for_rank(self, rank: int, size: int) -> list[ShardInfo]:
        """Shards of one rank: every ``size``-th shard starting at ``rank``.

        Together the ranks cover every shard exactly once.
        """
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside [0, {size})")
        return self.shards[rank::size]

    def rows_per_rank(self, size: int) -> list[int]:
        return [sum(s.rows for s in self.for_rank(r, size)) for r in range(size)]

    def steps_per_epoch(self, size: int, batch_size: int) -> int:
        """Steps every rank runs per epoch: the smallest rank's full batches.

        All ranks run the same number of steps so that no allreduce waits on a rank that ran out.
        """
        return min(self.rows_per_rank(size)) // batch_size


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    fingerprint: str
    created_at: str
    feature_spec: FeatureSpec
    schema_: dict[str, str] = Field(alias="schema")
    splits: dict[str, SplitInfo]

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise ShardError(
                f"manifest has no split {name!r} (has {sorted(self.splits)})"
            ) from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path}: no manifest, so {folder} is not a committed shard folder")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as err:
        raise ShardError(f"{path}: unreadable manifest: {err}") from None


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(folder: str | Path, shard: ShardInfo, checksum: bool = True) -> Path:
    """The shard's path, once its size (and checksum) match the manifest."""
    path = Path(folder) / shard.path
    if not path.is_file():
        raise ShardError(f"{path}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != shard.bytes:
        raise ShardError(f"{path}: {size} bytes on disk, the manifest says {shard.bytes}")
    if checksum and (digest := sha256_file(path)) != shard.sha256:
        raise ShardError(f"{path}: sha256 {digest[:12]}… does not match the manifest")
    return path


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` durably (temp file, fsync, rename)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
