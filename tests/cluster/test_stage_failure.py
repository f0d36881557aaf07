"""Which rank a failed stage names: the cause, not a peer whose collective failed after it."""

from __future__ import annotations

import threading

from lepton_spark.cluster.stage import _stage_failure
from lepton_spark.errors import BarrierError, StallError
from lepton_spark.events import RankFailed

ECHO = (
    "rank 0 on 127.0.0.1 failed: HorovodInternalError: Horovod has been shut down. This was "
    "caused by an exception on one of the ranks"
)
KILLED = "rank 1 on 127.0.0.1 was killed by SIGKILL (out of memory, or killed from outside)"


def test_the_killed_rank_is_named_though_its_peer_reported_first():
    failures = [RankFailed(rank=0, error=ECHO)]
    late = threading.Timer(0.3, lambda: failures.append(RankFailed(rank=1, error=KILLED)))
    late.start()
    try:
        message, kind = _stage_failure(RuntimeError("stage failed"), failures)
    finally:
        late.join()
    assert (message, kind) == (KILLED, BarrierError)


def test_an_echo_alone_is_still_told_and_a_stall_keeps_its_kind():
    message, kind = _stage_failure(RuntimeError("x"), [RankFailed(rank=0, error=ECHO)])
    assert (message, kind) == (ECHO, BarrierError)
    stalled = RankFailed(rank=1, error="rank 1 stalled: no progress for 31 s", stalled=True)
    failures = [RankFailed(rank=0, error=ECHO), stalled]
    assert _stage_failure(RuntimeError("x"), failures) == (stalled.error, StallError)
