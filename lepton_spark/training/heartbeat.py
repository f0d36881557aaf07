"""Rank side of the stall watch: where this rank is, sent to the driver once a second if it moved.

The training loop calls ``beat(epoch, step, doing, n)`` at each step (an assignment, nothing
more); a thread sends the latest position as a :class:`~lepton_spark.events.Heartbeat`. The
driver's :class:`~lepton_spark.cluster.watchdog.StallWatch` reads them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lepton_spark.events import Heartbeat, Phase

Beat = Callable[..., None]  # beat(epoch, step, doing=Phase.TRAINING, n=0)


def no_beat(epoch: int, step: int, doing: Phase = Phase.TRAINING, n: int = 0) -> None:
    """The ``beat`` of a rank nobody watches (a test, a single process)."""


class HeartbeatSender:
    """``beat`` is cheap enough for every step; sending happens on a thread. ``close`` it."""

    def __init__(
        self,
        send: Callable[[Heartbeat], None],
        rank: int,
        host: str,
        interval_s: float = 1.0,
    ) -> None:
        self._send = send
        self._rank = rank
        self._host = host
        self._interval = interval_s
        self._position = (-1, 0, Phase.TRAINING, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lepton-heartbeat", daemon=True)
        self._thread.start()

    def beat(self, epoch: int, step: int, doing: Phase = Phase.TRAINING, n: int = 0) -> None:
        self._position = (epoch, step, doing, n)

    def _run(self) -> None:
        sent = None
        while True:
            position = self._position
            if position != sent:
                epoch, step, doing, n = position
                self._send(
                    Heartbeat(
                        rank=self._rank, host=self._host, epoch=epoch, step=step, doing=doing, n=n
                    )
                )
                sent = position
            if self._stop.wait(self._interval):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
