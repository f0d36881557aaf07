"""The dataset fingerprint: what the shards were made from, so a second run can reuse them.

It covers the input data as it is now (for files: every file's path, size and modification time;
for tables: the Delta version when there is one, else the table's files; for generated data: the
generator settings), the SQL transform, the feature spec, the split and the sharding settings. Any
change gives a new fingerprint and a new shard folder; the same fingerprint finds the committed one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

from pyspark.sql import SparkSession

from lepton_spark import __version__
from lepton_spark.config import PipelineConfig, SourceConfig
from lepton_spark.errors import DataError
from lepton_spark.shards.manifest import FORMAT_VERSION

log = logging.getLogger(__name__)

FileState = tuple[str, int, int]  # path, bytes, modification time (ms)


def _hadoop(spark: SparkSession) -> tuple[Any, Any]:
    return spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()


def _state(status: Any) -> FileState:
    """A Hadoop ``FileStatus`` as (path, bytes, modification time)."""
    return status.getPath().toString(), status.getLen(), status.getModificationTime()


def list_files(spark: SparkSession, path: str) -> list[FileState]:
    """Every file under ``path`` (a file, folder or glob, any Hadoop filesystem), sorted."""
    jvm, conf = _hadoop(spark)
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(conf)
    matches = fs.globStatus(hpath)
    if not matches:
        raise DataError(f"path {path} does not exist")
    files: list[FileState] = []
    for status in matches:
        if status.isDirectory():
            found = fs.listFiles(status.getPath(), True)
            while found.hasNext():
                files.append(_state(found.next()))
        else:
            files.append(_state(status))
    return sorted(files)


def _file_states(spark: SparkSession, uris: list[str]) -> list[FileState]:
    jvm, conf = _hadoop(spark)
    states = []
    for uri in uris:
        hpath = jvm.org.apache.hadoop.fs.Path(uri)
        states.append(_state(hpath.getFileSystem(conf).getFileStatus(hpath)))
    return sorted(states)


def _table_version(spark: SparkSession, table: str) -> int | None:
    """The Delta (or other versioned) table's current version, when it has one."""
    try:
        row = spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").first()
    except Exception:  # not a versioned table: fall back to its files
        return None
    return int(row["version"]) if row is not None else None


def source_state(spark: SparkSession, name: str, source: SourceConfig) -> dict[str, Any]:
    """What this source is made of right now."""
    if source.generate is not None:
        return {"generate": source.generate.model_dump(mode="json")}
    if source.table is not None:
        version = _table_version(spark, source.table)
        if version is not None:
            return {"table": source.table, "version": version}
        try:
            files = _file_states(spark, list(spark.table(source.table).inputFiles()))
        except Exception as err:
            raise DataError(f"source {name!r}: table {source.table!r}: {err}") from None
        return {"table": source.table, "files": files}
    assert source.path is not None
    try:
        files = list_files(spark, source.path)
    except DataError as err:
        raise DataError(f"source {name!r}: {err}") from None
    return {"path": source.path, "format": source.format, "options": source.options, "files": files}


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    """The state without its file list (which can be long): counts, bytes, newest change."""
    files = state.get("files")
    if files is None:
        return state
    rest = {k: v for k, v in state.items() if k != "files"}
    return {
        **rest,
        "files": len(files),
        "bytes": sum(f[1] for f in files),
        "newest_modification_ms": max((f[2] for f in files), default=0),
    }


def dataset_fingerprint(spark: SparkSession, cfg: PipelineConfig) -> tuple[str, dict[str, Any]]:
    """The fingerprint (hex) and a readable summary of what it covers (for the manifest)."""
    states = {name: source_state(spark, name, src) for name, src in cfg.sources.items()}
    for name, state in states.items():
        if "files" in state and not state["files"]:
            # A view over in-memory or JDBC data: nothing tells whether it changed, so its shards
            # are never reused (a fresh value makes this fingerprint unique).
            log.info("source %r has no files or version to fingerprint: shards are rewritten", name)
            state["unversioned"] = uuid.uuid4().hex
    shards = cfg.shards.model_dump(mode="json", exclude={"root", "skew_warning"})
    payload = {
        "format_version": FORMAT_VERSION,
        "lepton_spark": __version__,
        "sources": states,
        "transform": cfg.transform,
        "features": cfg.features.model_dump(mode="json"),
        "split": cfg.split.model_dump(mode="json"),
        "shards": shards,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    summary = {**payload, "sources": {n: _summary(s) for n, s in states.items()}}
    return digest, summary
