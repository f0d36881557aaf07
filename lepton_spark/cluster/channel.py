"""One channel from the ranks to the driver: the typed events of :mod:`lepton_spark.events`, one
signed JSON object per line over TCP.

The driver owns the MLflow run and the console; ranks send progress and metrics here and the
driver logs them as they arrive. This works whether the tracking store is a server the executors
could reach or a local sqlite file they cannot. The server binds to the driver's own address and
lives only as long as the barrier stage. What it takes, and what it refuses:

- every line is ``{"sender", "seq", "body", "sig"}``: ``sig`` is HMAC-SHA256 over sender, seq and
  body with the stage's random key (which travels to the tasks inside the barrier function, and
  is never sent on this channel); ``seq`` rises per sender, so a replayed line is refused;
- ``body`` must be a valid event of its schema;
- a line longer than ``MAX_LINE_BYTES`` closes its connection; more than ``MAX_CONNECTIONS`` at
  once are refused; a connection with no valid line within ``FIRST_LINE_TIMEOUT_S``, or silent
  for ``IDLE_TIMEOUT_S`` after, is closed (senders reconnect; what a rank could not send comes
  back with its result and is logged then).

A refused line is dropped and counted by reason (:attr:`EventServer.dropped`), never handed on:
no forged metric reaches MLflow, and nothing a peer sends can stop the heartbeats of real ranks
from reaching the stall watch.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import secrets
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable

from lepton_spark.cluster.startup import SHUTDOWN_POLL_S
from lepton_spark.events import Event, Heartbeat, InvalidEvent, decode, encode

log = logging.getLogger(__name__)

ENV_VAR = "LEPTON_EVENTS"  # host:port:key, for the rank's child process
RECONNECT_AFTER_S = 5.0
CONNECT_TIMEOUT_S = 3.0
MAX_LINE_BYTES = 1 << 20  # an epoch's metrics are a few kB
MAX_CONNECTIONS = 256  # each rank holds two
IDLE_TIMEOUT_S = 60.0  # ranks beat every second while they work
FIRST_LINE_TIMEOUT_S = 5.0  # a connection with no valid line by then goes (idle floods clear)


def sign(key: str, sender: str, seq: int, body: str) -> str:
    message = f"{sender}\n{seq}\n{body}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(FIRST_LINE_TIMEOUT_S)  # until it has shown it holds the key
        self.accepted = self.server.open_connections(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.open_connections(-1)

    def handle(self) -> None:
        if not self.accepted:
            self.server.drop("refused", "over the connection limit")
            return
        try:
            while line := self.rfile.readline(MAX_LINE_BYTES + 1):
                if len(line) > MAX_LINE_BYTES:
                    self.server.drop("oversized", f"of more than {MAX_LINE_BYTES} bytes")
                    return  # the rest of that line is not read: the connection goes
                if self.server.receive(line):
                    self.connection.settimeout(IDLE_TIMEOUT_S)
        except (TimeoutError, OSError):  # idle, or the peer went away
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, host: str, on_event: Callable[[Event], None]) -> None:
        super().__init__((host, 0), _Handler)
        self.key = secrets.token_hex(32)
        self.dropped: Counter[str] = Counter()
        self._on_event = on_event
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._connections = 0
        self._idle = threading.Condition()

    def open_connections(self, delta: int) -> bool:
        with self._idle:
            if delta > 0 and self._connections >= MAX_CONNECTIONS:
                self._connections += delta  # finish() takes it back
                return False
            self._connections += delta
            self._idle.notify_all()
            return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every sender has hung up, so that no event in flight is lost."""
        with self._idle:
            return self._idle.wait_for(lambda: self._connections == 0, timeout=timeout)

    def drop(self, reason: str, why: str) -> bool:
        """Count a refused message (said once per reason); ``False``, for :meth:`receive`."""
        with self._lock:
            self.dropped[reason] += 1
            first = self.dropped[reason] == 1
        (log.warning if first else log.debug)("event channel: dropped a message %s", why)
        return False

    def receive(self, line: bytes) -> bool:
        """Hand on the event in ``line`` if it is signed, fresh and valid; whether it was."""
        try:
            data = json.loads(line)
        except ValueError:
            return self.drop("not_json", "that is not JSON")
        if not isinstance(data, dict) or not isinstance(data.get("sig"), str):
            return self.drop("unsigned", "without a signature")
        sender, seq, body = data.get("sender"), data.get("seq"), data.get("body")
        if not (isinstance(sender, str) and isinstance(seq, int) and isinstance(body, str)):
            return self.drop("unsigned", "without sender, seq and body")
        if not hmac.compare_digest(sign(self.key, sender, seq, body), data["sig"]):
            return self.drop("bad_signature", "with a wrong signature")
        with self._lock:
            if seq <= self._seen.get(sender, -1):
                replayed = True
            else:
                replayed, self._seen[sender] = False, seq
        if replayed:
            return self.drop("replayed", f"replayed (sender {sender[:8]}, seq {seq})")
        try:
            event = decode(body)
        except InvalidEvent as err:
            return self.drop("invalid", f"that is not a valid event ({err})")
        self.dispatch(event)
        return True

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
    """Driver side. ``address`` is what ranks need (``host:port:token``).

    It binds to ``host``; when ``host`` is not this machine's (a NAT's address the ranks reach
    it by: ``spark.events_host``), it binds to every interface and tells the ranks ``host``.
    """

    def __init__(self, host: str, on_event: Callable[[Event], None]) -> None:
        try:
            self._server = _Server(host, on_event)
        except OSError as err:
            if err.errno != errno.EADDRNOTAVAIL:
                raise
            log.info("event channel: %s is not this machine's address; listening on all", host)
            self._server = _Server("0.0.0.0", on_event)
        self._host = host
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(SHUTDOWN_POLL_S,),
            name="lepton-events",
            daemon=True,
        )

    @property
    def address(self) -> str:
        """``host:port:key``: for the tasks only (inside the barrier function), never logged."""
        port = self._server.server_address[1]
        return f"{self._host}:{port}:{self._server.key}"

    @property
    def where(self) -> str:
        """``host:port``, to say in messages."""
        return f"{self._host}:{self._server.server_address[1]}"

    @property
    def dropped(self) -> dict[str, int]:
        """Messages refused so far, by reason (``oversized``, ``not_json``, ``unsigned``,
        ``bad_signature``, ``replayed``, ``invalid``, ``refused`` connections)."""
        return {reason: n for reason, n in self._server.dropped.items() if n}

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
    failure, events are dropped for ``RECONNECT_AFTER_S`` seconds, then it connects again; a
    connection quiet for half the server's idle timeout is renewed before the next line."""

    def __init__(self, address: str) -> None:
        host, port, self._key = address.rsplit(":", 2)
        self._target = (host, int(port))
        self._sender = secrets.token_hex(8)
        self._seq = 0
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._sent_at = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        try:
            body = json.dumps(encode(event))
        except AttributeError:  # not an event: a bug in the rank's code, not worth its life
            log.warning("not an event, not sent: %r", event)
            return
        with self._lock:
            now = time.monotonic()
            if now < self._retry_at:
                return
            self._seq += 1
            signed = {"sender": self._sender, "seq": self._seq, "body": body}
            signed["sig"] = sign(self._key, self._sender, self._seq, body)
            line = (json.dumps(signed) + "\n").encode()
            if self._sock is not None and now - self._sent_at > IDLE_TIMEOUT_S / 2:
                self._close()  # the server may have closed it: a line into it would be lost
            try:
                if self._sock is None:
                    self._sock = socket.create_connection(self._target, timeout=CONNECT_TIMEOUT_S)
                self._sock.sendall(line)
                self._sent_at = now
            except OSError as err:
                self._close()
                self._retry_at = time.monotonic() + RECONNECT_AFTER_S
                if not self._warned:
                    self._warned = True
                    log.warning("cannot reach the driver's event channel %s: %s", self._target, err)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    __call__ = send

    def close(self) -> None:
        with self._lock:
            self._close()
