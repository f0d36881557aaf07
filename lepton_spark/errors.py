"""Every error lepton-spark raises on purpose, sorted by what a scheduler should do about it.

Three kinds, and the exit code each gives ``lepton-spark run`` / ``score`` (:func:`exit_code` is the
one mapping; the CLI, ``jobs/`` and the docs use it):

========  ==========================  ==========================================================
code      kind                        meaning, and whether a retry helps
========  ==========================  ==========================================================
``0``     –                           success, or the run key's run had finished already
``2``     :class:`InputError`         the config, the data, the shards or a path cannot be used as
                                      they are: no retry helps until someone changes them
``3``     anything else               training failed (a rank's exception in model code) after
                                      ``train.retries``: perhaps, look at the error
``4``     :class:`InfrastructureError` the cluster cannot run the job now (too few slots or GPUs,
                                      a rank stalled or lost after the retries): yes, later
``130``   ``KeyboardInterrupt``       Ctrl-C or a scheduler's SIGTERM: the MLflow run is KILLED
========  ==========================  ==========================================================

Each class is re-exported by the module that raises it (``lepton_spark.config.ConfigError``,
``lepton_spark.cluster.stage.BarrierError``...), so either import works.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAINING = 3
EXIT_INFRA = 4
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input: the message names the file, field, column or shard at fault (exit 2)."""


class InfrastructureError(RuntimeError):
    """The cluster, not the input: too few slots, a stalled or lost rank (exit 4)."""


# -- bad input (exit 2) ----------------------------------------------------------------------------


class ConfigError(InputError):
    """The pipeline file cannot be used as it is; the message names the file and the field."""


class DataError(InputError):
    """The input data cannot be trained on; the message names the source or column."""


class ShardError(InputError):
    """A shard folder is missing, incomplete or does not match its manifest."""


class ScoringError(InputError):
    """The model, the input or the output place of a scoring job cannot be used."""


class BaselineError(InputError):
    """The frames or arguments cannot be used for an MLlib baseline."""


class PathError(InputError):
    """A folder the user pointed at cannot be written: it names the field or option and the
    path (exit 2; a full or failing disk is a :class:`StorageError`, exit 4)."""


class StorageError(InfrastructureError):
    """The storage under a path the user gave failed: no space left, read-only, I/O (exit 4)."""


def path_error(err: OSError, where: str, path: object) -> InputError | InfrastructureError:
    """The named error for an OS failure at ``path`` (given as ``where``: a config field such
    as ``shards.root``, or a CLI option such as ``--output``)."""
    import errno

    why = err.strerror or type(err).__name__
    storage = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
    if err.errno in storage:
        return StorageError(f"{where} {path}: {why}")
    return PathError(f"{where} {path} cannot be written: {why}")


# -- the barrier stage: exit 3, or 2/4 by the subclass ---------------------------------------------


class BarrierError(RuntimeError):
    """The barrier stage failed; the message names the rank and host when one failed (exit 3)."""


class RankInputError(BarrierError, InputError):
    """A rank found bad input (a shard that does not match its manifest, too few rows) (exit 2)."""


class SlotsError(BarrierError, InfrastructureError):
    """The cluster cannot run all ranks at once (exit 4)."""


class StallError(BarrierError, InfrastructureError):
    """No rank made progress within the stall timeout; the message names the ranks (exit 4)."""


# -- tools -----------------------------------------------------------------------------------------


class ClusterError(RuntimeError):
    """The local standalone cluster did not come up (the message points at its logs)."""


def exit_code(err: BaseException) -> int:
    """The process exit code for an error that ended a run (anything else: training failed)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, InputError):
        return EXIT_BAD_INPUT
    if isinstance(err, InfrastructureError):
        return EXIT_INFRA
    return EXIT_TRAINING
