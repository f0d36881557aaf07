"""Shard folders do not pile up: keep the newest committed ones per pipeline, remove the rest.

A pipeline (or an estimator fitted on ever new DataFrames) writes one folder per dataset
fingerprint, ``<name>-<fingerprint>-w<ranks>`` under ``shards.root``. After a new folder is
committed, :func:`collect` removes that pipeline's committed folders beyond the newest
``shards.keep``, newest by last use: a folder a run reuses is stamped (:func:`touch`, a small
``_last_used`` file), so a dataset trained on every day outlives the one-off folders written after
it. Folders without a manifest are another writer's work in progress, and folders a run holds a
lease on (:mod:`lepton_spark.shards.lease`) are being trained on: neither is touched.
``lepton-spark shards gc`` runs it by hand. No Spark.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lepton_spark.errors import ShardError
from lepton_spark.shards.lease import live_leases
from lepton_spark.shards.manifest import MANIFEST_NAME, read_manifest
from lepton_spark.shards.storage import Location, locate

log = logging.getLogger(__name__)

LAST_USED = "_last_used"  # an ISO timestamp, written when a run reuses the folder

FOLDER = re.compile(r"^(?P<name>.+)-(?P<fingerprint>[0-9a-f]{16})-w(?P<ranks>\d+)$")


@dataclass(frozen=True)
class Folder:
    name: str  # the pipeline's
    folder: str  # its name under the root
    created_at: str  # the manifest's
    last_used: str  # the later of created_at and the _last_used stamp


def touch(folder: str | Path | Location) -> None:
    """Stamp a committed folder as used now (a run reuses it); best effort, never fails a run."""
    place = locate(folder)
    try:
        place.child(LAST_USED).write_text_atomic(datetime.now(UTC).isoformat(timespec="seconds"))
    except OSError as err:
        log.warning("shards: could not stamp %s as used: %s", place.uri, err)


def _last_used(place: Location, created_at: str) -> str:
    stamp = place.child(LAST_USED)
    try:
        used = stamp.read_text().strip() if stamp.is_file() else ""
    except OSError:
        used = ""
    return max(created_at, used)


def committed(root: str | Path | Location, name: str | None = None) -> list[Folder]:
    """Committed shard folders under ``root`` (of pipeline ``name``), most recently used first."""
    place = locate(root)
    found = []
    for folder in place.subfolders():
        match = FOLDER.match(folder)
        if match is None or (name is not None and match["name"] != name):
            continue
        if not place.child(folder, MANIFEST_NAME).is_file():
            continue  # being written (or abandoned mid-way): not ours to judge
        try:
            created = read_manifest(place.child(folder)).created_at
        except ShardError as err:  # an unreadable manifest is reported, not removed
            log.warning("shards gc: skipping %s: %s", folder, err)
            continue
        used = _last_used(place.child(folder), created)
        found.append(Folder(match["name"], folder, created, used))
    return sorted(found, key=lambda f: (f.last_used, f.folder), reverse=True)


def collect(
    root: str | Path | Location,
    name: str | None,
    keep: int,
    protect: tuple[str, ...] = (),
) -> list[str]:
    """Remove committed folders beyond the newest ``keep`` of each pipeline (of ``name``, or of
    every pipeline under ``root``), never those in ``protect``; the URIs removed."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    place = locate(root)
    by_name: dict[str, list[Folder]] = {}
    for folder in committed(place, name):
        by_name.setdefault(folder.name, []).append(folder)
    removed = []
    for folders in by_name.values():
        for folder in folders[keep:]:
            target = place.child(folder.folder)
            if folder.folder in protect:
                continue
            if live_leases(target):
                log.info("shards gc: %s is leased by a run training on it: kept", target.uri)
                continue
            target.delete_folder()
            removed.append(target.uri)
            log.info("shards gc: removed %s (last used %s)", target.uri, folder.last_used)
    return removed
