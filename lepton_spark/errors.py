"""What can go wrong, sorted by what a scheduler should do about it.

``InputError``: the config, the data or the shards cannot be used as they are; running again
will not help until someone changes them (exit code 2). ``InfrastructureError``: the cluster
cannot run the job now (too few slots, a stalled or lost rank); a later retry may succeed
(exit code 4). A training failure that is neither (a rank's exception in the model code) is
exit code 3. :func:`exit_code` is the one mapping; the CLI and the docs use it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRAINING = 3
EXIT_INFRA = 4
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input: the message names the file, field, column or shard at fault."""


class InfrastructureError(RuntimeError):
    """The cluster, not the input: too few slots, a stalled or lost rank."""


def exit_code(err: BaseException) -> int:
    """The process exit code for an error that ended a run (anything else: training failed)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, InputError):
        return EXIT_BAD_INPUT
    if isinstance(err, InfrastructureError):
        return EXIT_INFRA
    return EXIT_TRAINING
