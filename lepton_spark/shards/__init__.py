"""The contract between Spark and the ranks: Arrow shard folders and how ranks read them.

:mod:`.format` (the file layout), :mod:`.manifest` (what a folder holds, which rank reads what),
:mod:`.deal` (the row blocks each rank reads, epoch by epoch),
:mod:`.commit` (attempt folders, the manifest written last), :mod:`.storage` (local paths and
``pyarrow.fs`` URIs), :mod:`.writer` (Spark's executors write the shards: the only module here
that imports pyspark), :mod:`.local` (the same without Spark), :mod:`.loader` (a rank's
rows as torch batches). Importing the package imports none of them; ``materialize`` (a
DataFrame → committed shards) comes lazily from :mod:`lepton_spark.distributed`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # ``lepton_spark.shards.materialize(df, ...)``: the public way to write a DataFrame as
    # shards, lazily from lepton_spark.distributed (it needs Spark and the ETL; the rest of this
    # room does not).
    if name == "materialize":
        from lepton_spark.distributed.frames import materialize

        return materialize
    raise AttributeError(f"module 'lepton_spark.shards' has no attribute {name!r}")
