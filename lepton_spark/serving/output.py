"""Where ``lepton-spark score`` writes: an output that is whole or absent, on any store.

Every output holds a marker, ``_LEPTON_SCORED.json`` (what scored it, when, how many rows), which
Spark and pyarrow skip as they skip every ``_`` file. The new output is written in full before the
old one is touched, in the way the store can do it:

- **local disks, HDFS** (a folder rename is one operation): written to a hidden sibling, marker
  included; then the old output is renamed aside, the new one renamed into place, and only then
  is the old one deleted. A failure at any point leaves the old output (put back if it had been
  moved aside) and no staging folder.
- **object stores** (S3, GCS: no folder rename): written under ``OUTPUT/attempt-<time>-<id>/``;
  the commit is the marker, one object put naming that attempt; older attempts are deleted after
  it. Read the attempt the marker names (:func:`committed_uri`, which ``score`` returns and the
  CLI prints). The executors write the Parquet files there with pyarrow
  (:func:`write_parts`, one ``part-NNNNN.parquet`` per partition: a retried task rewrites its
  own file, whole objects only), so no Hadoop S3A/GCS connector is needed; credentials come from
  the executors' environment (the store's usual variables) or the URI.

``--overwrite`` replaces only a previous scoring output (one with a marker), and never the working
directory, the home directory or a folder above either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow import fs as pafs
from pyspark.sql import DataFrame

from lepton_spark.errors import ScoringError
from lepton_spark.shards.storage import Location, check_writable, locate

log = logging.getLogger(__name__)

MARKER = "_LEPTON_SCORED.json"
KIND = "lepton-spark scoring output"
_RENAMING = ("local", "hadoop")  # filesystems where moving a folder is one rename


def renames_folders(location: Location) -> bool:
    return location.fs.type_name in _RENAMING


def check_destination(destination: Location, overwrite: bool) -> None:
    """Before any work: refuse an output that exists (without ``overwrite``), one that is not a
    previous scoring output, and the working or home directory or a folder above them."""
    if not destination.exists():
        if destination.is_local:
            check_writable(Path(destination.path), "--output")
        return
    if not overwrite:
        raise ScoringError(f"--output {destination.uri} exists; --overwrite replaces it")
    if destination.is_local:
        target = Path(destination.path).resolve()
        for name, guarded in (("working directory", Path.cwd()), ("home directory", Path.home())):
            guarded = guarded.resolve()
            if target == guarded or target in guarded.parents:
                what = "is" if target == guarded else "holds"
                raise ScoringError(
                    f"--output {destination.uri} {what} the {name}: --overwrite refuses it"
                )
    if not destination.child(MARKER).is_file():
        raise ScoringError(
            f"--output {destination.uri} exists and is not a lepton-spark scoring output (no "
            f"{MARKER}): --overwrite replaces only those; remove it yourself or choose another"
        )


def commit(write: Callable[[str], None], destination: Location, meta: dict[str, Any]) -> str:
    """Run ``write(uri)`` (a Spark write of the whole output) into a fresh place, then make it
    the output at ``destination``; return the URI to read it at."""
    marker = {"kind": KIND, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    marker.update(meta)
    if renames_folders(destination):
        return _commit_by_rename(write, destination, marker)
    return _commit_by_marker(write, destination, marker)


def writer(df: DataFrame, destination: Location) -> Callable[[str], None]:
    """How ``df`` is written as Parquet at a URI :func:`commit` gives: Spark's own writer where
    Spark's filesystems reach (local disks, HDFS), pyarrow on the executors on object stores."""
    if renames_folders(destination):
        return lambda uri: df.write.parquet(uri)
    return lambda uri: write_parts(df, uri)


def write_parts(df: DataFrame, uri: str) -> list[tuple[str, int]]:
    """Write ``df`` under ``uri`` (a ``pyarrow.fs`` URI) from the executors, one Parquet file per
    partition; the files and their row counts. The first partition writes a file even when it
    has no rows, so the output always has a schema to read."""
    from pyspark.sql.pandas.types import to_arrow_schema

    schema = to_arrow_schema(df.schema)

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()
        target = locate(uri).child(f"part-{partition:05d}.parquet")
        rows, out = 0, None
        for batch in batches:
            if out is None:
                out = pq.ParquetWriter(target.path, batch.schema, filesystem=target.fs)
            out.write_batch(batch)
            rows += batch.num_rows
        if out is None and partition == 0:
            out = pq.ParquetWriter(target.path, schema, filesystem=target.fs)
        if out is not None:
            out.close()
            yield pa.RecordBatch.from_pydict({"file": [target.uri], "rows": [rows]})

    written = df.mapInArrow(write, "file string, rows long").collect()
    return [(row["file"], row["rows"]) for row in written]


def committed_uri(destination: Location) -> str:
    """The URI of the output's data: the folder itself, or the attempt its marker names."""
    marker = json.loads(destination.child(MARKER).read_text())
    attempt = marker.get("attempt")
    return destination.child(attempt).uri if attempt else destination.uri


def _spark_uri(location: Location) -> str:
    # A local path as a file: URI, so that a cluster whose default filesystem is HDFS writes
    # where the user asked.
    return Path(location.path).as_uri() if location.is_local else location.uri


def _sibling(destination: Location, what: str) -> Location:
    name = destination.path.rstrip("/").rsplit("/", 1)[-1]
    hidden = f".{name}.{what}-{uuid.uuid4().hex[:8]}"
    parent_path = destination.path.rstrip("/").rsplit("/", 1)[0]
    base, sep, query = destination.uri.partition("?")
    parent_uri = base.rstrip("/").rsplit("/", 1)[0]
    return Location(destination.fs, f"{parent_path}/{hidden}", f"{parent_uri}/{hidden}{sep}{query}")


def _commit_by_rename(
    write: Callable[[str], None], destination: Location, marker: dict[str, Any]
) -> str:
    staging = _sibling(destination, "scoring")
    aside: Location | None = None
    try:
        write(_spark_uri(staging))
        staging.child(MARKER).write_text_atomic(json.dumps(marker, indent=2))
        if destination.exists():
            aside = _sibling(destination, "replaced")
            destination.fs.move(destination.path, aside.path)
        destination.fs.move(staging.path, destination.path)
    except BaseException:
        with contextlib.suppress(OSError):
            if aside is not None and not destination.exists():
                destination.fs.move(aside.path, destination.path)  # the old output back
                aside = None
            staging.delete_folder()
        raise
    if aside is not None:
        try:
            aside.delete_folder()
        except OSError as err:  # the new output is in place: say what is left, do not fail
            log.warning("the replaced output is left at %s: %s", aside.uri, err)
    return destination.uri


def _commit_by_marker(
    write: Callable[[str], None], destination: Location, marker: dict[str, Any]
) -> str:
    name = f"attempt-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    attempt = destination.child(name)
    try:
        write(attempt.uri)
        # The commit: one object put. Until it lands, the marker names the previous attempt.
        with destination.fs.open_output_stream(destination.child(MARKER).path) as out:
            out.write(json.dumps({**marker, "attempt": name}).encode())
    except BaseException:
        with contextlib.suppress(OSError):
            attempt.delete_folder()
        raise
    for info in destination.fs.get_file_info(pafs.FileSelector(destination.path)):
        if info.base_name in (name, MARKER):
            continue
        try:  # older attempts, and whatever a previous output had beside them
            if info.type == pafs.FileType.Directory:
                destination.fs.delete_dir(info.path)
            else:
                destination.fs.delete_file(info.path)
        except OSError as err:
            log.warning("could not remove %s from the previous output: %s", info.path, err)
    return attempt.uri
