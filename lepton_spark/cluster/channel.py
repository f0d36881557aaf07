"""One channel from the ranks to the driver: the typed events of :mod:`lepton_spark.events`, one
JSON object per line over TCP.

The driver owns the MLflow run and the console; ranks send progress and metrics here and the
driver logs them as they arrive. This works whether the tracking store is a server the executors
could reach or a local sqlite file they cannot. The server binds to the driver's own address,
accepts only lines carrying its random token, validates every message against its schema, and
lives only as long as the barrier stage. A line that is not a valid event is dropped and counted
(:attr:`EventServer.dropped`), never handed on.
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

from lepton_spark.events import Event, Heartbeat, InvalidEvent, decode, encode

log = logging.getLogger(__name__)

ENV_VAR = "LEPTON_EVENTS"  # host:port:token, for the rank's child process
TOKEN_FIELD = "token"
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
                data = json.loads(line)
            except ValueError:
                self.server.drop("not JSON")
                return
            if not isinstance(data, dict) or data.pop(TOKEN_FIELD, None) != self.server.token:
                self.server.drop("without the run's token")
                return
            try:
                event = decode(data)
            except InvalidEvent as err:
                self.server.drop(f"not a valid event ({err})")
                continue
            self.server.dispatch(event)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, on_event: Callable[[Event], None]) -> None:
        super().__init__((host, 0), _Handler)
        self.token = secrets.token_hex(16)
        self.dropped = 0
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

    def drop(self, why: str) -> None:
        with self._lock:
            self.dropped += 1
        log.warning("event channel: dropped a message %s", why)

    def dispatch(self, event: Event) -> None:
        if isinstance(event, Heartbeat):  # never queued behind a slow MLflow call
            self._on_event(event)  # (so the heartbeat handler must be thread-safe)
            return
        with self._lock:  # handlers (MLflow, console) see one event at a time
            try:
                self._on_event(event)
            except Exception:
                log.exception("event handler failed on %s", event.event)


class EventServer:
    """Driver side. ``address`` is what ranks need (``host:port:token``)."""

    def __init__(self, host: str, on_event: Callable[[Event], None]) -> None:
        self._server = _Server(host, on_event)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lepton-events", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}:{self._server.token}"

    @property
    def dropped(self) -> int:
        """Messages refused so far (no token, not JSON, not a valid event)."""
        return self._server.dropped

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
        try:
            data = encode(event)
        except AttributeError:  # not an event: a bug in the rank's code, not worth its life
            log.warning("not an event, not sent: %r", event)
            return
        data[TOKEN_FIELD] = self._token
        line = (json.dumps(data) + "\n").encode()
        with self._lock:
            if time.monotonic() < self._retry_at:
                return
            try:
                if self._sock is None:
                    self._sock = socket.create_connection(self._target, timeout=10)
                self._sock.sendall(line)
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
