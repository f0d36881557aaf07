"""Ctrl-C and a scheduler's SIGTERM, handled so that Spark is told, not cut off mid-call.

A ``KeyboardInterrupt`` raised inside a py4j call leaves that connection to the JVM half-read,
and the next call fails with a confusing error. So while a barrier stage runs, the handler only
records the interrupt and cancels the stage's job group from another thread (py4j gives each
thread its own connection); the stage's ``collect`` then fails the ordinary way, and
:func:`interrupted` tells the caller to raise ``KeyboardInterrupt``. Outside a stage the handler
raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_interrupted = threading.Event()
_callbacks: list[Callable[[], None]] = []
_lock = threading.Lock()


def install(*signals: signal.Signals) -> None:
    """Handle ``signals`` (default SIGTERM) this way; call from the main thread."""
    for signum in signals or (signal.SIGTERM,):
        signal.signal(signum, _handle)


def _handle(signum: int, frame: object) -> None:
    again = _interrupted.is_set()
    _interrupted.set()
    callbacks = list(_callbacks)  # no lock here: the main thread may hold it right now
    if again or not callbacks:  # a second signal does not wait for the cancel any more
        raise KeyboardInterrupt(f"signal {signum}")
    threading.Thread(
        target=lambda: [callback() for callback in callbacks], name="lepton-interrupt", daemon=True
    ).start()


def interrupted() -> bool:
    """Whether a handled signal has arrived."""
    return _interrupted.is_set()


@contextmanager
def on_interrupt(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` (on another thread) instead of raising, if a signal comes meanwhile."""
    with _lock:
        _callbacks.append(callback)
    try:
        yield
    finally:
        with _lock:
            _callbacks.remove(callback)
