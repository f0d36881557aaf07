"""Your own training function on the ranks of a lepton-spark barrier stage.

``run(fn, *args, num_workers=, backend=, spark=)`` runs ``fn(*args, **kwargs)`` on every rank of
one barrier stage (classic Spark or Spark Connect) with the process group already up, and returns
rank 0's value. Inside ``fn``, ``context()`` gives the rank, the size, the device, the shard
loader, live MLflow metrics, checkpoints and a heartbeat. ``materialize(df, ...)`` writes a
DataFrame as shards (or finds them by fingerprint) for ``context().loader``.

:mod:`.launch` (the driver's side: the stage, retries, MLflow), :mod:`.rank` (each rank's side:
the engine, then ``fn``), :mod:`.rank_context` (what ``context()`` returns; no Spark, no MLflow),
:mod:`.frames` (a DataFrame → a :class:`~lepton_spark.shards.writer.ShardSet`). Names are
imported lazily: a rank imports neither Spark nor MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Context", "context", "materialize", "run"]

if TYPE_CHECKING:
    from lepton_spark.distributed.frames import materialize
    from lepton_spark.distributed.launch import run
    from lepton_spark.distributed.rank_context import Context, context


def __getattr__(name: str) -> Any:
    if name == "run":
        from lepton_spark.distributed.launch import run

        return run
    if name in ("context", "Context"):
        from lepton_spark.distributed import rank_context as module

        return getattr(module, name)
    if name == "materialize":
        from lepton_spark.distributed.frames import materialize

        return materialize
    raise AttributeError(f"module 'lepton_spark.distributed' has no attribute {name!r}")
