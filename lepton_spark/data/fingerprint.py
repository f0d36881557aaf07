"""The dataset fingerprint: what the shards were made from, so a second run can reuse them.

It covers the input data as it is now (for files: every file's path, size and modification time;
for tables: the Delta version when there is one, else the table's plan and files, so a temporary
view of a notebook's DataFrame is fingerprinted by its query; for generated data: the generator
settings), the SQL transform, the feature spec, the split and the sharding settings. Any change
gives a new fingerprint and a new shard folder; the same fingerprint finds the committed one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lepton_spark import __version__
from lepton_spark.config import PipelineConfig, SourceConfig
from lepton_spark.errors import ConfigError, DataError
from lepton_spark.names import INPUT_VIEW_PREFIX
from lepton_spark.shards.manifest import FORMAT_VERSION
from lepton_spark.sparkinfo import Session, is_connect

log = logging.getLogger(__name__)

FileState = tuple[str, int, int]  # path, bytes, modification time (ms)
_FOLDERS = 10  # the folders a summary names (the fingerprint covers every file)


def list_files(spark: Session, *paths: str) -> list[FileState]:
    """Every data file under ``paths`` (files, folders or globs, on any Hadoop filesystem),
    sorted; hidden files (``_SUCCESS``, ``.crc``) as Spark's own readers skip them.

    Asked through Spark's ``binaryFile`` source (only the listing: no file is read), so a Spark
    Connect client gets the same answer as the driver of a classic session.
    """
    try:
        rows = (
            spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .load(list(paths))
            .select("path", "length", F.unix_millis("modificationTime").alias("ms"))
            .collect()
        )
    except AnalysisException as err:
        raise DataError(f"path {', '.join(paths)} does not exist ({_first_line(err)})") from None
    return sorted((str(r["path"]), int(r["length"]), int(r["ms"])) for r in rows)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _table_version(spark: Session, table: str) -> int | None:
    """The Delta (or other versioned) table's current version, when it has one."""
    try:
        row = spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").first()
    except Exception:  # not a versioned table: fall back to its files
        return None
    return int(row["version"]) if row is not None else None


def _is_temporary(spark: Session, table: str) -> bool:
    """Whether ``table`` is a temporary view (a session's DataFrame, by its query)."""
    try:
        return bool(spark.catalog.getTable(table).isTemporary)
    except Exception:  # not in the catalog as such: not a view of ours
        return False


def _children(message: Any) -> Iterator[Any]:
    """The messages directly inside a protobuf message (fields, lists and map values)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                yield from value.values()
        elif field.is_repeated:
            yield from value
        else:
            yield value


def _clear_plan_ids(message: Any) -> None:
    """Clear what differs between two sends of the same Connect plan: per-client plan ids and
    call-site origins (the ``common`` field of relations and expressions)."""
    if any(field.name == "common" for field, _ in message.ListFields()):
        message.ClearField("common")
    for child in _children(message):
        _clear_plan_ids(child)


def _named_tables(message: Any, found: set[str]) -> set[str]:
    """The tables and views a Connect plan reads by name."""
    for field, value in message.ListFields():
        if field.name == "named_table" and hasattr(value, "unparsed_identifier"):
            found.add(value.unparsed_identifier)
    for child in _children(message):
        _named_tables(child, found)
    return found


def plan_identity(df: DataFrame) -> int | str:
    """The DataFrame's query, the same for the same query.

    Classic Spark: the analyzed plan's ``semanticHash``. Spark Connect: the client's plan
    (without plan ids) and the ``semanticHash`` of each table or view it reads by name. The
    server's own hash of a whole Connect plan is not stable: the server plans it again on every
    call, and Spark ML's Connect transformers (``SQLTransformer``, ``StringIndexer``) make a new
    temporary view name and a new UDF each time. A view this package registered
    (``TorchEstimator.fit``'s) is named by its DataFrame's identity already.
    """
    session = df.sparkSession
    if not is_connect(session):
        return int(df.semanticHash())
    plan = df._plan.to_proto(session.client)  # type: ignore[attr-defined]
    _clear_plan_ids(plan)
    names = sorted(_named_tables(plan, set()))
    tables = {
        name: int(session.table(name).semanticHash())
        for name in names
        if not name.startswith(INPUT_VIEW_PREFIX)
    }
    payload = plan.SerializeToString(deterministic=True) + json.dumps(tables).encode()
    return hashlib.sha256(payload).hexdigest()


def frame_state(df: DataFrame) -> dict[str, Any]:
    """A DataFrame as it is now: its plan (:func:`plan_identity`: the same query, the same
    identity), its schema, and the state of the files Spark reports it reads.

    A DataFrame built in a notebook, from local data or ``range``, has its data in its plan; one
    over files changes when they do. (A JDBC or other non-file relation looks the same while its
    rows change: rebuild its shards by hand, ``--rebuild-shards``.)
    """
    files = list(df.inputFiles())
    return {
        "plan": plan_identity(df),
        "schema": df.schema.json(),
        "files": list_files(df.sparkSession, *files) if files else [],
        "files_reported": len(files),
    }


def source_state(spark: Session, name: str, source: SourceConfig) -> dict[str, Any]:
    """What this source is made of right now."""
    if source.generate is not None:
        return {"generate": source.generate.model_dump(mode="json")}
    if source.table is not None:
        version = _table_version(spark, source.table)
        if version is not None:
            return {"table": source.table, "version": version}
        try:
            state = frame_state(spark.table(source.table))
            return {"table": source.table, "temporary": _is_temporary(spark, source.table), **state}
        except AnalysisException as err:
            raise DataError(
                f"source {name!r}: table {source.table!r}: {_first_line(err)}"
            ) from None
    assert source.path is not None
    try:
        files = list_files(spark, source.path)
    except DataError as err:
        raise DataError(f"source {name!r}: {err}") from None
    return {"path": source.path, "format": source.format, "options": source.options, "files": files}


def _unversioned(state: dict[str, Any]) -> bool:
    if "generate" in state or "version" in state or state.get("files"):
        return False
    return "path" in state or not state.get("temporary")


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    """The state without its file list (which can be long): counts, bytes, newest change."""
    files = state.get("files")
    if files is None:
        return state
    rest = {k: v for k, v in state.items() if k not in ("files", "schema")}
    folders = sorted({f[0].rsplit("/", 1)[0] for f in files})
    return {
        **rest,
        "folders": folders[:_FOLDERS]
        + ([f"... {len(folders) - _FOLDERS} more"] if len(folders) > _FOLDERS else []),
        "files": len(files),
        "bytes": sum(f[1] for f in files),
        "newest_modification_ms": max((f[2] for f in files), default=0),
    }


def dataset_fingerprint(spark: Session, cfg: PipelineConfig) -> tuple[str, dict[str, Any]]:
    """The fingerprint (hex) and a readable summary of what it covers (for the manifest)."""
    states = {name: source_state(spark, name, src) for name, src in cfg.sources.items()}
    for name, state in states.items():
        if _unversioned(state):
            # Nothing tells whether it changed (an empty folder may fill up; a catalog table over
            # JDBC has no files): its shards are never reused (a fresh value makes this
            # fingerprint unique). A temporary view is its query: fingerprinted by its plan.
            log.info("source %r has no files or version to fingerprint: shards rewritten", name)
            state["unversioned"] = uuid.uuid4().hex
    shards = cfg.shards.model_dump(mode="json", exclude={"root", "skew_warning", "keep"})
    if shards["compression"] == "none":  # added later: folders written before it stay reused
        del shards["compression"]
    features = cfg.features.model_dump(mode="json")
    for text in features["text"]:
        if text.get("tokenizer") is None:  # added in 0.3: folders written before it stay reused
            text.pop("tokenizer", None)
        else:  # the tokenizer's content, not only where it is
            text["tokenizer_sha256"] = _tokenizer_digest(text["tokenizer"])
    payload = {
        "format_version": FORMAT_VERSION,
        "lepton_spark": __version__,
        "sources": states,
        "transform": cfg.transform,
        "features": features,
        "split": cfg.split.model_dump(mode="json"),
        "shards": shards,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    summary = {**payload, "sources": {n: _summary(s) for n, s in states.items()}}
    return digest, summary


def _tokenizer_digest(where: str) -> str:
    """sha256 of a Hugging Face tokenizer's ``tokenizer.json`` (what decides its token ids)."""
    from lepton_spark.shards.storage import locate

    target = locate(where).child("tokenizer.json")
    if not target.is_file():
        raise ConfigError(
            f"features.text tokenizer {where!r}: no tokenizer.json there (save a fast "
            "tokenizer with save_pretrained)"
        )
    return target.sha256()
