"""One channel from the ranks to the driver: newline-delimited JSON over TCP.

The driver owns the MLflow run and the console; ranks send progress and metrics here and the
driver logs them as they arrive. This works whether the tracking store is a server the executors
could reach or a local sqlite file they cannot. The server binds to the driver's own address,
accepts only messages carrying its random token, and lives only as long as the barrier stage.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Event = dict[str, Any]
ENV_VAR = "LEPTON_EVENTS"
# Dispatched at once, outside the lock that orders the others: their handler must be thread-safe.
UNLOCKED_EVENTS = frozenset({"heartbeat"})
RECONNECT_AFTER_S = 5.0


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.open_connections(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.open_connections(-1)

    def handle(self) -> None:
        for line in self.rfile:
            try:
                event = json.loads(line)
            except ValueError:
                return
            if not isinstance(event, dict) or event.pop("token", None) != self.server.token:
                log.warning("event channel: dropped a connection without the run's token")
                return
            self.server.dispatch(event)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, on_event: Callable[[Event], None]) -> None:
        super().__init__((host, 0), _Handler)
        self.token = secrets.token_hex(16)
        self._on_event = on_event
        self._lock = threading.Lock()
        self._connections = 0
        self._idle = threading.Condition()

    def open_connections(self, delta: int) -> None:
        with self._idle:
            self._connections += delta
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every sender has hung up, so that no event in flight is lost."""
        with self._idle:
            return self._idle.wait_for(lambda: self._connections == 0, timeout=timeout)

    def dispatch(self, event: Event) -> None:
        if event.get("event") in UNLOCKED_EVENTS:  # never queued behind a slow MLflow call
            self._on_event(event)
            return
        with self._lock:  # handlers (MLflow, console) see one event at a time
            try:
                self._on_event(event)
            except Exception:
                log.exception("event handler failed on %s", event.get("event"))


class EventServer:
    """Driver side. ``address`` is what ranks need (host:port:token)."""

    def __init__(self, host: str, on_event: Callable[[Event], None]) -> None:
        self._server = _Server(host, on_event)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lepton-events", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}:{self._server.token}"

    def __enter__(self) -> EventServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._server.wait_idle(timeout=10):
            log.warning("event channel: closing with senders still connected")
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class EventClient:
    """Rank side. Sending never raises: a lost driver must not kill training by itself. After a
    failure, events are dropped for ``RECONNECT_AFTER_S`` seconds, then it connects again."""

    def __init__(self, address: str) -> None:
        host, port, self._token = address.rsplit(":", 2)
        self._target = (host, int(port))
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        data = (json.dumps({**event, "token": self._token}) + "\n").encode()
        with self._lock:
            if time.monotonic() < self._retry_at:
                return
            try:
                if self._sock is None:
                    self._sock = socket.create_connection(self._target, timeout=10)
                self._sock.sendall(data)
            except OSError as err:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                self._retry_at = time.monotonic() + RECONNECT_AFTER_S
                if not self._warned:
                    self._warned = True
                    log.warning("cannot reach the driver's event channel %s: %s", self._target, err)

    __call__ = send

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
