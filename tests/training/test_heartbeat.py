"""A rank's heartbeat: where it is, sent on a thread, stopped when closed."""

from __future__ import annotations

import time

from lepton_spark import events
from lepton_spark.training.heartbeat import HeartbeatSender
from tests.helpers import wait_until


def test_heartbeats_reach_the_driver_and_stop_when_closed():
    sent: list[events.Heartbeat] = []
    beat = HeartbeatSender(sent.append, rank=3, host="h", interval_s=0.05)
    # Its thread's first beat (the start-up position) before the next: not a race with it.
    assert wait_until(lambda: len(sent) >= 1, 60)
    beat.beat(0, 7)
    assert wait_until(lambda: any((e.epoch, e.step) == (0, 7) for e in sent), 60)
    beat.close()
    count = len(sent)
    beat.beat(0, 8)
    time.sleep(0.2)
    assert len(sent) == count
    assert (sent[0].rank, sent[0].host, sent[0].epoch, sent[0].step) == (3, "h", -1, 0)
    assert all(e.doing == events.Phase.TRAINING for e in sent)
