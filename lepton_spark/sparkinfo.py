"""What lepton-spark asks of a Spark session, answered for classic Spark and Spark Connect alike.

A Connect client has no SparkContext and no JVM; these helpers ask each kind what it can tell
(a classic session its context, a Connect session its server's configuration). Duck-typed: this
module imports no pyspark, so any room may use it.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any
from urllib.parse import urlparse

Session = Any  # pyspark.sql.SparkSession, or pyspark.sql.connect.session.SparkSession


def is_connect(spark: Session) -> bool:
    """Whether ``spark`` is a Spark Connect client session (no SparkContext, no JVM here)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def conf_value(spark: Session, key: str, default: str | None = None) -> str | None:
    """A Spark setting as the session sees it (on Connect: the server's), or ``default``."""
    try:
        value = spark.conf.get(key, default)
    except Exception:  # some Connect servers refuse to read a few static settings
        return default
    return default if value is None else str(value)


def master_of(spark: Session) -> str:
    """The master URL the session's jobs run on (``local[2]``, ``spark://h:7077`` ...)."""
    if not is_connect(spark):
        return str(spark.sparkContext.master)
    return conf_value(spark, "spark.master", "") or ""


def local_cores(master: str) -> int | None:
    """The cores of a local master: ``local[N]`` (and ``local[N, retries]``) N,
    ``local-cluster[workers, cores, memory]`` workers × cores; ``None`` for ``local[*]`` and
    cluster masters."""
    master = master.strip()
    if master == "local":
        return 1
    cluster = re.fullmatch(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]", master)
    if cluster:
        return int(cluster.group(1)) * int(cluster.group(2))
    found = re.fullmatch(r"local\[(\d+)(?:,\s*\d+)?\]", master)
    return int(found.group(1)) if found else None


def default_parallelism(spark: Session) -> int:
    """How many partitions Spark would make by default (classic: the context's; Connect: the
    ``local[N]`` cores, ``spark.default.parallelism``, or 2)."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    configured = conf_value(spark, "spark.default.parallelism")
    if configured and configured.isdigit():
        return int(configured)
    return local_cores(master_of(spark)) or 2


def events_host(spark: Session, configured: str | None = None) -> str:
    """The address the ranks reach the driver's event channel at.

    ``configured`` (the config's ``spark.events_host``) when set; on classic Spark,
    ``spark.driver.host`` (the address Spark itself tells executors); on Connect, the address of
    this machine's interface that reaches the server (loopback when the server is on loopback).
    """
    if configured:
        return configured
    if not is_connect(spark):
        return conf_value(spark, "spark.driver.host", "127.0.0.1") or "127.0.0.1"
    return client_address(connect_url(spark))


def connect_url(spark: Session) -> str:
    """The ``sc://host:port`` a Connect session talks to."""
    builder = getattr(getattr(spark, "client", None), "_builder", None)
    endpoint = getattr(builder, "endpoint", None)
    if endpoint:
        return f"sc://{endpoint}"
    return os.environ.get("SPARK_REMOTE", "sc://127.0.0.1:15002")


def client_address(url: str) -> str:
    """This machine's address on the route to ``url``'s host (no packet is sent)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 15002
    try:
        target = socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"
    if target.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, port))  # UDP: chooses the route, sends nothing
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def set_log_level(spark: Session, level: str) -> None:
    """Spark's driver log level (classic only: a Connect client has no driver log)."""
    if not is_connect(spark):
        spark.sparkContext.setLogLevel(level)
