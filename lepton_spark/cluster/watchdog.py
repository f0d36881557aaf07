"""No silent hangs: the driver fails a training stage that stops moving, naming the rank.

:class:`StallWatch` reads every rank's :class:`~lepton_spark.events.Heartbeat` (sent by
:mod:`lepton_spark.training.heartbeat`). When no rank's position has changed for ``timeout_s``
seconds (or a rank has not started within ``startup_s``), it calls ``on_stall`` once with a
message naming the rank(s) furthest behind and their hosts. In data-parallel training the others
wait for them in a collective, so the ranks furthest behind are the ones stuck.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lepton_spark.events import Heartbeat, Phase

log = logging.getLogger(__name__)

_DOING = {
    Phase.TRAINING: "training step {step}",
    Phase.CHECKPOINT: "writing the checkpoint after step {step}",
    Phase.EVALUATING: "evaluating (batch {n})",
    Phase.REDUCING: "reducing the epoch's metrics",
    Phase.EPOCH_CHECKPOINT: "writing the epoch's checkpoint",
}


@dataclass(frozen=True, order=True)
class RankState:
    """Where a rank is: comparable, so that the lowest is the furthest behind."""

    epoch: int = -1  # -1: started, not training yet
    step: int = 0
    doing: Phase = Phase.TRAINING
    n: int = 0

    @classmethod
    def of(cls, beat: Heartbeat) -> RankState:
        return cls(beat.epoch, beat.step, beat.doing, beat.n)

    def describe(self) -> str:
        if self.epoch < 0:
            return "at start-up (the engine's init, reading the manifest, checking the shards)"
        return f"at epoch {self.epoch + 1}, " + _DOING[self.doing].format(step=self.step, n=self.n)


class StallWatch:
    """Driver side. Feed it every heartbeat (``observe``); ``close`` when the stage is over."""

    def __init__(
        self,
        num_ranks: int,
        timeout_s: float,
        startup_s: float,
        on_stall: Callable[[str], None],
        poll_s: float = 0.5,
        setting: str = "train.stall_timeout_s",
    ) -> None:
        self.num_ranks = num_ranks
        self.timeout_s = timeout_s
        self.startup_s = startup_s
        self._on_stall = on_stall
        self._setting = setting  # the knob the message names
        self._positions: dict[int, tuple[RankState, str]] = {}
        self._started = time.monotonic()
        self._moved = self._started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._blind = False
        self.message: str | None = None
        self._thread = threading.Thread(
            target=self._run, args=(poll_s,), name="lepton-stall-watch", daemon=True
        )
        self._thread.start()

    def observe(self, beat: Heartbeat) -> None:
        with self._lock:
            self._positions[beat.rank] = (RankState.of(beat), beat.host)
            self._moved = time.monotonic()

    def check(self, now: float | None = None) -> str | None:
        """The stall message if the stage has stalled by ``now``, else ``None``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not self._positions:
                # Not one report: more likely the ranks cannot reach the driver's event channel
                # (a firewall) than all of them hanging at once. Stall detection is off then.
                if now - self._started >= self.startup_s and not self._blind:
                    self._blind = True
                    log.warning(
                        "no rank has reported to the driver in %.0f s (the event channel may be "
                        "blocked); stall detection is off for this stage",
                        now - self._started,
                    )
                return None
            missing = [r for r in range(self.num_ranks) if r not in self._positions]
            if missing:
                if now - self._started < self.startup_s:
                    return None
                return (
                    f"rank(s) {', '.join(map(str, missing))} did not start within "
                    f"{self.startup_s:.0f} s (their tasks never reached training)"
                )
            lowest = min(p for p, _ in self._positions.values())
            idle = now - self._moved
            limit = self.startup_s if lowest.epoch < 0 else self.timeout_s
            if idle < limit:
                return None
            stuck = sorted(r for r, (p, _) in self._positions.items() if p == lowest)
            names = ", ".join(f"rank {r} on {self._positions[r][1]}" for r in stuck)
            others = (
                "; the other ranks wait for it in a collective"
                if len(stuck) < self.num_ranks
                else ""
            )
            return (
                f"{names} stalled: no progress for {idle:.0f} s (limit {limit:g} s, "
                f"{self._setting}), stuck {lowest.describe()}{others}"
            )

    def _run(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            message = self.check()
            if message is not None:
                self.message = message
                self._on_stall(message)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
