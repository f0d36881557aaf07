"""The Spark session a pipeline runs in: an active one as it is, or one built from the config.

Local masters get loopback-only defaults (no traffic leaves the machine); every session gets
Arrow on and a barrier stage that fails fast when it cannot get its slots.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from lepton_spark.config import SparkConfig

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
}


def spark_session(cfg: SparkConfig, app_name: str = "lepton-spark") -> SparkSession:
    """Get or create the SparkSession for this config.

    An active session (a notebook's, spark-submit's) is reused as it is; otherwise one is built
    from ``cfg`` with executors running this interpreter.
    """
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
    conf.update(cfg.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark


def submitted_session(cfg: SparkConfig, app_name: str = "lepton-spark") -> SparkSession:
    """The session of a spark-submit job: spark-submit's ``--master``, ``--conf`` and properties
    file win; the pipeline's ``spark.conf`` and lepton-spark's defaults fill in the rest."""
    from pyspark import SparkConf

    given = SparkConf()  # what spark-submit passed to this driver
    master = given.get("spark.master", cfg.master)
    conf = dict(_DEFAULTS)
    if master.startswith("local"):
        conf.update(_LOCAL_DEFAULTS)
    conf.update(cfg.conf)
    builder = SparkSession.builder.appName(app_name)
    for key, value in conf.items():
        if not given.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark
