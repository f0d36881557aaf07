"""The stall watch: which rank is stuck, and when to say so."""

from __future__ import annotations

import time

from lepton_spark.cluster.watchdog import RankState, StallWatch
from lepton_spark.events import Heartbeat, Phase


def heartbeat(rank: int, epoch: int, step: int, doing: Phase = Phase.TRAINING) -> Heartbeat:
    return Heartbeat(rank=rank, host=f"host{rank}", epoch=epoch, step=step, doing=doing)


def test_the_stall_watch_names_the_rank_furthest_behind():
    stalls: list[str] = []
    watch = StallWatch(3, timeout_s=10, startup_s=30, on_stall=stalls.append, poll_s=3600)
    try:
        t0 = watch._started  # its own clock: no time passes between two checks on a slow machine
        watch.observe(heartbeat(0, -1, 0))
        assert watch.check(t0 + 29) is None  # ranks may take the startup allowance
        assert "rank(s) 1, 2 did not start within 30 s" in watch.check(t0 + 31)
        watch.observe(heartbeat(1, -1, 0))
        watch.observe(heartbeat(2, -1, 0))
        for step in range(1, 51):
            for rank in (0, 1, 2):
                watch.observe(heartbeat(rank, 0, step))
        watch.observe(heartbeat(0, 0, 51))  # ranks 0 and 2 move on; rank 1 does not
        watch.observe(heartbeat(2, 0, 51))
        moved = watch._moved  # the last observe's own time
        assert watch.check(moved + 9) is None
        message = watch.check(moved + 11)
        assert message is not None
        assert message.startswith("rank 1 on host1 stalled: no progress for 11 s")
        assert "at epoch 1, training step 50" in message
        assert "the other ranks wait for it" in message
        watch.observe(heartbeat(1, 0, 51))  # everyone at the same place: all are named
        assert "rank 0 on host0, rank 1 on host1, rank 2 on host2" in watch.check(watch._moved + 11)
    finally:
        watch.close()
    assert stalls == []  # the poll thread never ran: check() decides, on_stall only reports


def test_without_a_single_report_the_stall_watch_stays_quiet():
    """No heartbeat at all: the event channel is blocked, not every rank hung at once."""
    watch = StallWatch(2, timeout_s=10, startup_s=30, on_stall=lambda m: None, poll_s=3600)
    try:
        assert watch.check(time.monotonic() + 3600) is None
    finally:
        watch.close()


def test_a_rank_writing_a_checkpoint_is_behind_the_ranks_waiting_for_it():
    waiting = RankState(0, 21, Phase.TRAINING)
    writing = RankState(0, 20, Phase.CHECKPOINT)
    evaluating = RankState(0, 100, Phase.EVALUATING, 3)
    reducing = RankState(0, 100, Phase.REDUCING)
    assert writing < waiting < evaluating < reducing < RankState(1, 1, Phase.TRAINING)
    assert RankState().describe().startswith("at start-up")
