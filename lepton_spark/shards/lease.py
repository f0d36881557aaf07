"""Leases on a shard folder: a run that trains on a folder holds one, and nothing removes the
folder's files while a lease is live.

A lease is a small file ``_leases/<id>.json`` in the folder (``expires_at``, who holds it), put
when a run starts training on the folder and removed when it ends. A commit of a new attempt in
the same folder leaves the older attempts alone while any lease is live (a later commit or
``lepton-spark shards gc`` removes them), and garbage collection skips a leased folder. A driver
that was killed leaves its lease until it expires (``ttl_s``, a day by default): that blocks
clean-up, never a run. Written through :mod:`lepton_spark.shards.storage`, so it works on local
disks, HDFS and object stores alike. No Spark.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pyarrow import fs as pafs

from lepton_spark.shards.storage import Location, locate

log = logging.getLogger(__name__)

LEASES = "_leases"
DEFAULT_TTL_S = 24 * 3600.0


@contextlib.contextmanager
def lease(folder: str | Path | Location, ttl_s: float = DEFAULT_TTL_S) -> Iterator[str]:
    """Hold a lease on ``folder`` for the duration of the block; its id."""
    place = locate(folder)
    lease_id = uuid.uuid4().hex
    target = place.child(LEASES, f"{lease_id}.json")
    record = {
        "expires_at": time.time() + ttl_s,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    try:
        place.fs.create_dir(place.child(LEASES).path, recursive=True)
        target.write_text_atomic(json.dumps(record))
    except OSError as err:  # a lease that cannot be written must not stop training
        log.warning("shards: could not take a lease on %s: %s", place.uri, err)
    try:
        yield lease_id
    finally:
        with contextlib.suppress(OSError):
            place.fs.delete_file(target.path)


def live_leases(folder: str | Path | Location, now: float | None = None) -> int:
    """How many unexpired leases ``folder`` has (an unreadable lease counts as live)."""
    place = locate(folder)
    leases = place.child(LEASES)
    if not leases.exists():
        return 0
    now = time.time() if now is None else now
    count = 0
    for info in place.fs.get_file_info(pafs.FileSelector(leases.path)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            expires = float(json.loads(leases.child(info.base_name).read_text())["expires_at"])
        except (OSError, ValueError, KeyError, TypeError):
            expires = float("inf")
        count += expires > now
    return count
