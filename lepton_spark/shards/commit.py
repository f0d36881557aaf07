"""Committing a shard folder: every write goes to a new attempt, the manifest is written last.

A shard folder (local path or ``pyarrow.fs`` URI) holds ``manifest.json`` and one *attempt*
subfolder with the files it lists: ``attempt-<id>/<split>/part-00000.arrow``. Every write goes to a
new attempt; the manifest is written last, atomically, and only then are older attempts removed.
So a folder is either whole (its manifest lists complete files) or has no manifest at all, on any
filesystem, without renaming folders (which object stores cannot do atomically). No Spark.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lepton_spark.errors import ShardError
from lepton_spark.redact import redact_tree
from lepton_spark.shards.format import shard_schema
from lepton_spark.shards.lease import live_leases
from lepton_spark.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    SplitInfo,
    read_manifest,
    verify_shard,
    write_manifest,
)
from lepton_spark.shards.storage import Location, locate
from lepton_spark.spec import FeatureSpec

ATTEMPT_PREFIX = "attempt-"

log = logging.getLogger(__name__)


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
    compression: str = "none",
) -> Manifest:
    return Manifest(
        fingerprint=fingerprint,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        feature_spec=spec,
        schema={f.name: str(f.type) for f in shard_schema(spec)},
        strategy=strategy,
        key=key,
        compression=compression,
        source=redact_tree(dict(source or {})),  # a manifest is read by anyone who reads data
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
    which may be another writer's work in progress, and none while a run holds a lease on the
    folder: it may be training on one)."""
    place = locate(folder)
    if live_leases(place):
        log.info("shards: %s is leased by a run training on it: older attempts stay", place.uri)
        return
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
