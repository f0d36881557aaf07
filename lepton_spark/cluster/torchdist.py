"""torch.distributed's part of the barrier stage (``train.backend`` ``ddp`` or ``fsdp``).

Rank 0's task starts :class:`StoreService`: the ranks' key-value store (what torch's
``TCPStore`` would be), bound to its executor's own address (never 0.0.0.0), answering only the
stage's slot addresses and only requests signed with the stage's secret
(:mod:`lepton_spark.storewire`), and closed as soon as every rank's process group is up. Every
rank's child process gets :func:`torch_env`: the engine builds its
:class:`~lepton_spark.training.store.GuardedStore` from it, and gloo (CPU) or NCCL (GPU) bind to
the interface that address is on. torch's own ``TCPStore`` is not used: it listens on every
interface of the host and authenticates nothing.
"""

from __future__ import annotations

import http.server
import json
import logging
import socketserver
import threading
import urllib.parse
from collections.abc import Callable

from lepton_spark import storewire
from lepton_spark.cluster.startup import StartupServer
from lepton_spark.cluster.topology import Slot, slot_addresses

log = logging.getLogger(__name__)


def torch_env(slot: Slot, store: tuple[str, int], iface: str, secret: str) -> dict[str, str]:
    """A rank's torch.distributed environment: its place in the stage, rank 0's store service
    and its secret, and the interface for gloo and NCCL (the timeout comes from the rank's train
    config)."""
    return {
        "RANK": str(slot.rank),
        "WORLD_SIZE": str(slot.size),
        "LOCAL_RANK": str(slot.local_rank),
        "LOCAL_WORLD_SIZE": str(slot.local_size),
        "GROUP_RANK": str(slot.cross_rank),
        storewire.ENV_ADDRESS: f"{store[0]}:{store[1]}",
        storewire.ENV_SECRET: secret,
        "GLOO_SOCKET_IFNAME": iface,
        "NCCL_SOCKET_IFNAME": iface,
    }


class _Table:
    """The store's keys and values; ``get`` and ``wait`` block until their keys come."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.changed = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self.changed:
            self.data[key] = value
            self.changed.notify_all()

    def wait(self, keys: list[str], timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: all(k in self.data for k in keys), timeout_s)

    def get(self, key: str, timeout_s: float) -> bytes | None:
        """The value once the key is there (``None``: not within ``timeout_s``)."""
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.data, timeout_s):
                return None
            return self.data[key]

    def add(self, key: str, amount: int) -> int:
        with self.changed:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            self.changed.notify_all()
            return value

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """torch's rule: set ``desired`` when the value is ``expected`` (or the key is missing
        and ``expected`` is empty); the value after, either way."""
        with self.changed:
            current = self.data.get(key)
            if (current is None and expected == b"") or current == expected:
                self.data[key] = desired
                self.changed.notify_all()
                return desired
            return expected if current is None else current

    def delete(self, key: str) -> bool:
        with self.changed:
            return self.data.pop(key, None) is not None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # one kept-alive connection per rank thread
    disable_nagle_algorithm = True  # an answer is two writes (head, body): no 40 ms ACK wait
    timeout = storewire.IDLE_TIMEOUT_S  # on every read: a silent peer holds no thread for long

    def setup(self) -> None:
        super().setup()
        self.accepted = self.server.open_connections(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.open_connections(-1)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("torch store: " + format, *args)

    def _refuse(self, why: str) -> None:
        self.server.refuse(self.client_address[0], why)
        self.close_connection = True
        self._answer(403, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._refuse("a GET")

    def do_PUT(self) -> None:
        self._refuse("a PUT")

    def do_POST(self) -> None:
        server = self.server
        if not self.accepted:
            self._refuse(f"over the limit of {storewire.MAX_CONNECTIONS} connections")
            return
        if self.client_address[0] not in server.allowed:
            self._refuse("from an address outside the stage")
            return
        op = self.path.lstrip("/")
        try:
            length = int(self.headers.get("Content-Length", "0"))
            timeout_ms = int(self.headers.get(storewire.TIMEOUT_HEADER, "0"))
        except ValueError:
            self._refuse("with bad headers")
            return
        if op not in storewire.OPS or not 0 <= length <= storewire.MAX_BODY_BYTES:
            self._refuse(f"of an unknown op or size ({op[:20]!r}, {length} bytes)")
            return
        body = self.rfile.read(length)
        quoted = self.headers.get(storewire.KEY_HEADER, "")
        nonce = self.headers.get(storewire.NONCE_HEADER, "")
        sig = self.headers.get(storewire.SIG_HEADER, "")
        if not storewire.valid(server.secret, op, quoted, nonce, timeout_ms, body, sig):
            self._refuse("with a wrong signature")
            return
        if not server.fresh(nonce):
            self._refuse("replayed")
            return
        status, answer = server.serve(op, urllib.parse.unquote(quoted), body, timeout_ms / 1000)
        self._answer(status, answer)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a waiting client never holds up a stop
    block_on_close = False

    def __init__(self, host: str, allowed: set[str], secret: str, size: int) -> None:
        super().__init__((host, 0), _Handler)
        self.allowed = allowed
        self.connections = 0
        self.secret = secret
        self.size = size
        self.table = _Table()
        self.refused = 0
        self.ready: set[str] = set()
        self.on_ready: Callable[[], None] = lambda: None  # every rank is ready
        self.on_rank_ready: Callable[[], None] = lambda: None  # one more is
        self._nonces: set[str] = set()
        self._lock = threading.Lock()

    def server_bind(self) -> None:
        # HTTPServer's would look its own name up (getfqdn: seconds without reverse DNS).
        socketserver.TCPServer.server_bind(self)

    def open_connections(self, delta: int) -> bool:
        with self._lock:
            self.connections += delta
            return delta < 0 or self.connections <= storewire.MAX_CONNECTIONS

    def refuse(self, client: str, why: str) -> None:
        with self._lock:
            self.refused += 1
            first = self.refused == 1
        (log.warning if first else log.debug)("torch store: refused a request %s (%s)", why, client)

    def fresh(self, nonce: str) -> bool:
        with self._lock:
            if len(nonce) < 16 or nonce in self._nonces:
                return False
            self._nonces.add(nonce)
            return True

    def serve(self, op: str, key: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        table = self.table
        if op == "set":
            table.set(key, body)
            return 200, b""
        if op == "get":
            value = table.get(key, timeout_s)
            return (storewire.TIMED_OUT, b"") if value is None else (200, value)
        if op == "add":
            return 200, str(table.add(key, int(body or b"0"))).encode()
        if op == "cas":
            size = int.from_bytes(body[:8], "big")
            return 200, table.compare_set(key, body[8 : 8 + size], body[8 + size :])
        if op in ("check", "wait"):
            keys = json.loads(body)
            if op == "check":
                with table.changed:
                    return 200, b"1" if all(k in table.data for k in keys) else b"0"
            return (200, b"") if table.wait(keys, timeout_s) else (storewire.TIMED_OUT, b"")
        if op == "delete":
            return 200, b"1" if table.delete(key) else b"0"
        if op == "num":
            with table.changed:
                return 200, str(len(table.data)).encode()
        # ready: a rank's process group is up
        with self._lock:
            self.ready.add(key)
            done = len(self.ready) >= self.size
        self.on_rank_ready()
        if done:
            self.on_ready()
        return 200, b""


class StoreService(StartupServer):
    """torch.distributed's store for one stage's start-up, served by rank 0's task.

    It answers only the stage's slot addresses, and only requests signed with the stage's secret
    that it has not seen before; anything else gets 403 and is counted (:attr:`refused`). Once
    every rank has said its process group is up (``ready``), it closes itself, before it answers
    the last rank: the gloo or NCCL connections are made, and nothing may join them later.
    """

    def __init__(self, host: str, slots: list[Slot], secret: str) -> None:
        httpd = _Server(host, slot_addresses(slots), secret, len(slots))
        httpd.on_ready = self.close_now  # before the last rank's answer
        httpd.on_rank_ready = self.rank_in
        super().__init__(httpd, "torch-store")

    @property
    def refused(self) -> int:
        """Requests turned away: from an address not in the stage, unsigned, or replayed."""
        return int(self._httpd.refused)  # type: ignore[attr-defined]
