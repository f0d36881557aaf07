"""The Spark session a pipeline runs in, classic or Spark Connect, and what lepton-spark asks of it.

An active session (a notebook's, spark-submit's) is used as it is; otherwise one is built from the
config: a classic session on ``spark.master``, or a Spark Connect client of ``spark.remote``
(``sc://HOST:PORT``). Local masters get loopback-only defaults (no traffic leaves the machine);
every classic session gets Arrow on and a barrier stage that fails fast when it cannot get its
slots. A Connect session has no SparkContext: what lepton-spark asks of a session is answered
for both kinds by :mod:`lepton_spark.sparkinfo`.

One process holds one kind: once a Connect session exists, pyspark's functions build Connect
columns (pyspark's own rule), so classic and Connect sessions do not mix in one interpreter.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from pyspark.sql import SparkSession

from lepton_spark.config import SparkConfig
from lepton_spark.errors import ConfigError, InfrastructureError
from lepton_spark.sparkinfo import Session, set_log_level

log = logging.getLogger(__name__)

# Loopback-only defaults for local masters: no traffic leaves the machine, and the addresses ranks
# use to reach each other and the driver are the ones Spark reports.
_LOCAL_DEFAULTS = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.ui.enabled": "false",
}

_DEFAULTS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    # A barrier stage that cannot get all its slots fails fast instead of retrying for minutes
    # (we check slots before submitting, this is the backstop).
    "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "2",
    "spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "2s",
    # A barrier sync (the stage's allGather of the rendezvous port) that some task never reaches
    # fails in an hour, not in Spark's default year: a bound that holds with no event channel.
    "spark.barrier.sync.timeout": "3600s",
}

# pyspark (4.x) logs every SQL or DataFrame error it raises as a JSON line on stderr, through
# loggers of its own that do not propagate (Python's logging, not the JVM's log4j). lepton-spark
# reports each error it catches itself, naming the field or source, so on a session it makes these
# stay quiet unless ``spark.log_level`` is DEBUG; an uncaught error still shows Spark's message.
_QUERY_CONTEXT_LOGGERS = ("SQLQueryContextLogger", "DataFrameQueryContextLogger")


def quiet_query_context_logs(level: str) -> None:
    """Keep pyspark's JSON line per failed query off the console (at ``level`` DEBUG: left on)."""
    from pyspark.logger import PySparkLogger

    for name in _QUERY_CONTEXT_LOGGERS:
        # pyspark's own class (its records carry extra fields a plain Logger would refuse)
        logger = PySparkLogger.getLogger(name)
        logger.setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)


def spark_session(cfg: SparkConfig, app_name: str = "lepton-spark") -> Session:
    """Get or create the session for this config: the active one, else a Connect client of
    ``cfg.remote`` (or ``SPARK_REMOTE``), else a classic session on ``cfg.master`` with
    executors running this interpreter."""
    remote = cfg.remote or os.environ.get("SPARK_REMOTE")
    if remote:
        return connect_session(remote, cfg)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(cfg.master).appName(cfg.app_name or app_name)
    conf = dict(_DEFAULTS)
    if cfg.master.startswith("local"):
        conf.update(_LOCAL_DEFAULTS)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    conf.update(read_properties(cfg.properties_file) if cfg.properties_file else {})
    conf.update(cfg.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    set_log_level(spark, cfg.log_level)
    quiet_query_context_logs(cfg.log_level)
    return spark


def read_properties(path: str) -> dict[str, str]:
    """A Spark properties file as spark-submit reads one: ``key value`` (or ``key=value``,
    ``key: value``) lines; ``#`` and ``!`` comments."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"spark.properties_file {path}: {err.strerror or err}") from None
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, value = ([*re.split(r"\s*[=:]\s*|\s+", line, maxsplit=1), ""])[:2]
            conf[key] = value
    return conf


def connect_session(remote: str, cfg: SparkConfig) -> Session:
    """A Spark Connect client of ``remote``. Only runtime settings can be set from a client
    (``spark.sql.*`` and the like); the rest of ``spark.conf`` is the server's, and is skipped
    with a note."""
    _reachable(remote)
    spark = SparkSession.builder.remote(remote).getOrCreate()
    quiet_query_context_logs(cfg.log_level)
    skipped = []
    for key, value in {**_DEFAULTS, **cfg.conf}.items():
        try:
            spark.conf.set(key, value)
        except Exception:  # a static setting: the server was started with its own
            if key in cfg.conf:
                skipped.append(key)
            else:
                log.debug("Spark Connect: %s is the server's setting; not set from here", key)
    if skipped:
        log.warning(
            "Spark Connect: spark.conf %s cannot be set from a client (the server's settings "
            "stand); start the server with them instead",
            ", ".join(sorted(skipped)),
        )
    return spark


def _reachable(remote: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, naming the URL, when no server listens there (pyspark's own client
    retries for up to ten minutes, meant for a server that restarts)."""
    parsed = urlparse(remote)
    host, port = parsed.hostname or "localhost", parsed.port or 15002
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise InfrastructureError(
            f"cannot reach the Spark Connect server {remote} (spark.remote / --remote): {err}"
        ) from None


def submitted_session(cfg: SparkConfig, app_name: str = "lepton-spark") -> SparkSession:
    """The session of a spark-submit job: spark-submit's ``--master``, ``--conf`` and properties
    file win; the pipeline's ``spark.conf`` and lepton-spark's defaults fill in the rest."""
    from pyspark import SparkConf

    given = SparkConf()  # what spark-submit passed to this driver
    master = given.get("spark.master", cfg.master)
    conf = dict(_DEFAULTS)
    if master.startswith("local"):
        conf.update(_LOCAL_DEFAULTS)
    conf.update(read_properties(cfg.properties_file) if cfg.properties_file else {})
    conf.update(cfg.conf)
    builder = SparkSession.builder.appName(app_name)
    for key, value in conf.items():
        if not given.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    set_log_level(spark, cfg.log_level)
    quiet_query_context_logs(cfg.log_level)
    return spark
