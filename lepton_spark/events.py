"""The messages from the ranks to the driver: typed, versioned, validated where they arrive.

A rank reports what it does as it happens; the driver turns the reports into console output,
MLflow metrics and the stall watch's view. The transport (:mod:`lepton_spark.cluster.channel`)
moves them as one JSON object per line; :func:`encode` and :func:`decode` are the only ways
in and out, so a message that does not match its schema (a wrong type, a missing or unknown field,
another version) is refused at the door instead of surprising a consumer later.

===============  ===================  ======================================================
``event``        sent by              what it says
===============  ===================  ======================================================
``start``        rank 0               the attempt started: ranks, device, precision, epochs
``progress``     rank 0               every ``train.progress_every_steps`` steps: loss,
                                      throughput
``epoch``        rank 0               an epoch's allreduced metrics (named as in ``names``)
``heartbeat``    every rank           where the rank is (:class:`Phase`), once a second
``rank_failed``  every rank's task    the rank's error: bad input? stopped by its task?
``rendezvous``   rank 0's task        where the Horovod rendezvous server listens
``retry``        the driver           the training stage runs again (for the console)
``metrics``      rank 0 of a ``run``  a user function's ``log_metrics(dict, step)``
``dropped``      the driver           the event channel refused messages (by reason), at the
                                      end of a stage: logged as ``events/dropped_<reason>``
===============  ===================  ======================================================

Pure pydantic: importable by the ranks without Spark or MLflow.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

VERSION = 1


class Phase(IntEnum):
    """What a rank is doing, in the order an epoch goes through them (a heartbeat's ``doing``)."""

    TRAINING = 0
    CHECKPOINT = 1
    EVALUATING = 2
    REDUCING = 3
    EPOCH_CHECKPOINT = 4


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = VERSION


class Start(_Message):
    event: Literal["start"] = "start"
    size: int = Field(gt=0)
    device: str
    precision: str
    epochs: int = Field(ge=0)
    steps_per_epoch: int = Field(ge=0)
    attempt: int = Field(ge=0)
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint
    code: str = ""  # where the ranks' lepton_spark came from


class Progress(_Message):
    event: Literal["progress"] = "progress"
    epoch: int = Field(ge=1)  # 1-based
    step: int = Field(ge=0)
    steps: int = Field(ge=0)
    global_step: int = Field(ge=0)
    loss: float  # rank 0's mean since the epoch (or the resume) started
    window_loss: float  # rank 0's mean since the last report
    samples_per_second: float  # the cluster's, since the last report


class Epoch(_Message):
    event: Literal["epoch"] = "epoch"
    epoch: int = Field(ge=1)
    metrics: dict[str, float]


class Heartbeat(_Message):
    event: Literal["heartbeat"] = "heartbeat"
    rank: int = Field(ge=0)
    host: str
    epoch: int = Field(ge=-1)  # -1: started, not training yet
    step: int = Field(ge=0)
    doing: Phase = Phase.TRAINING
    n: int = Field(0, ge=0)  # the batch being evaluated


class RankFailed(_Message):
    event: Literal["rank_failed"] = "rank_failed"
    rank: int = Field(ge=0)
    error: str
    input_error: bool = False  # bad input: no retry helps
    stalled: bool = False  # stopped by its own task's watch


class Rendezvous(_Message):
    event: Literal["rendezvous"] = "rendezvous"
    host: str
    port: int = Field(gt=0, lt=65536)


class Retry(_Message):
    event: Literal["retry"] = "retry"
    attempt: int = Field(ge=1)
    of: int = Field(ge=1)


class Metrics(_Message):
    """A user function's metrics (``lepton_spark.distributed``: ``context().log_metrics``)."""

    event: Literal["metrics"] = "metrics"
    rank: int = Field(ge=0)
    step: int = Field(ge=0)
    metrics: dict[str, float]


class Dropped(_Message):
    event: Literal["dropped"] = "dropped"
    counts: dict[str, int]  # reason → messages (or connections) refused


Event = Annotated[
    Start | Progress | Epoch | Heartbeat | RankFailed | Rendezvous | Retry | Metrics | Dropped,
    Field(discriminator="event"),
]
_EVENT: TypeAdapter[Any] = TypeAdapter(Event)


class InvalidEvent(ValueError):
    """A message that is not valid JSON or does not match any event's schema."""


def encode(message: _Message) -> dict[str, Any]:
    """The message as plain JSON values (what :func:`decode` takes back)."""
    return message.model_dump(mode="json")


def decode(data: str | bytes | dict[str, Any]) -> Event:
    """The typed event in ``data`` (a JSON line or an already parsed object)."""
    try:
        parsed = json.loads(data) if isinstance(data, str | bytes) else data
    except ValueError as err:
        raise InvalidEvent(f"not JSON: {err}") from None
    try:
        return _EVENT.validate_python(parsed)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in err.errors()
        )
        raise InvalidEvent(problems) from None
