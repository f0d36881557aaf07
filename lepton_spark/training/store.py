"""The rank's side of torch.distributed's store in a barrier stage: :class:`GuardedStore`.

A ``torch.distributed.Store`` that sends each operation, signed with the stage's secret, to
rank 0's store service (:mod:`lepton_spark.storewire` is the wire). ``init_process_group`` is
given it instead of a ``TCPStore``; once the process group is up the rank says ``ready``
(:meth:`GuardedStore.ready`), and the service closes when every rank has. No Spark, no MLflow.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import secrets
import threading
import time
import urllib.parse

import torch.distributed as dist

from lepton_spark import storewire

RETRY_CONNECT_S = 30.0  # rank 0's task may start its service a moment after this rank asks
NOT_IDEMPOTENT = frozenset({"add", "cas"})
ANSWER_MARGIN_S = 30.0  # beyond an op's own wait, for the service to answer


class StoreError(RuntimeError):
    """The store service refused a request or could not be reached."""


class GuardedStore(dist.Store):
    """torch's ``Store`` over rank 0's guarded store service (thread-safe: one kept-alive
    connection per thread)."""

    def __init__(self, address: str, secret: str, timeout: datetime.timedelta) -> None:
        super().__init__()
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._secret = secret
        self._local = threading.local()
        self.set_timeout(timeout)

    @classmethod
    def from_env(cls, timeout: datetime.timedelta) -> GuardedStore | None:
        """The store the barrier task's environment names, or ``None`` outside a stage."""
        address = os.environ.get(storewire.ENV_ADDRESS)
        if not address:
            return None
        return cls(address, os.environ[storewire.ENV_SECRET], timeout)

    # -- the wire --------------------------------------------------------------------------------

    def _connection(self, fresh: bool, timeout_s: float) -> http.client.HTTPConnection:
        """This thread's connection; ``fresh``: a new one (the service closes idle ones, and
        an op that must not be sent twice must not meet a connection closed under it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and fresh:
            conn.close()
            conn = None
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port)
            self._local.conn = conn
        conn.timeout = timeout_s  # a service gone without a reset is not waited on forever
        if conn.sock is not None:
            conn.sock.settimeout(timeout_s)
        return conn

    def _call(self, op: str, key: str = "", body: bytes = b"", timeout_ms: int = 0) -> bytes:
        quoted = urllib.parse.quote(key, safe="")
        deadline = time.monotonic() + RETRY_CONNECT_S
        while True:
            nonce = secrets.token_hex(16)
            headers = {
                storewire.KEY_HEADER: quoted,
                storewire.NONCE_HEADER: nonce,
                storewire.TIMEOUT_HEADER: str(timeout_ms),
                storewire.SIG_HEADER: storewire.signature(
                    self._secret, op, quoted, nonce, timeout_ms, body
                ),
                "Content-Length": str(len(body)),
            }
            conn = self._connection(op in NOT_IDEMPOTENT, timeout_ms / 1000 + ANSWER_MARGIN_S)
            try:
                conn.request("POST", f"/{op}", body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                conn.close()
                self._local.conn = None
                # Sent again only where it cannot count twice: an ``add`` the service may have
                # taken before the connection broke is not.
                again = isinstance(err, ConnectionRefusedError) or op not in NOT_IDEMPOTENT
                if not again or time.monotonic() > deadline:
                    raise StoreError(
                        f"torch store at {self._host}:{self._port} unreachable ({op}): {err}"
                    ) from err
                time.sleep(0.2)
        if response.status == storewire.TIMED_OUT:
            raise dist.DistStoreError(
                f"torch store: timed out after {timeout_ms / 1000:.0f} s waiting for {key!r}"
            )
        if response.status != 200:
            raise StoreError(f"torch store refused {op} {key!r} (HTTP {response.status})")
        return answer

    def _timeout_ms(self, timeout: datetime.timedelta | None = None) -> int:
        return int((timeout or self.timeout).total_seconds() * 1000)

    # -- torch's Store ---------------------------------------------------------------------------

    def set(self, key: str, value: bytes | str) -> None:
        self._call("set", key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        return self._call("get", key, timeout_ms=self._timeout_ms())

    def add(self, key: str, value: int) -> int:
        return int(self._call("add", key, str(int(value)).encode()))

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        old = expected.encode() if isinstance(expected, str) else bytes(expected)
        new = desired.encode() if isinstance(desired, str) else bytes(desired)
        return self._call("cas", key, len(old).to_bytes(8, "big") + old + new)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", body=json.dumps(list(keys)).encode()) == b"1"

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        body = json.dumps(list(keys)).encode()
        self._call("wait", body=body, timeout_ms=self._timeout_ms(timeout))

    def delete_key(self, key: str) -> bool:
        return self._call("delete", key) == b"1"

    def num_keys(self) -> int:
        return int(self._call("num"))

    # torch's C++ side calls a Python store by its C++ names for these two.
    getNumKeys = num_keys
    deleteKey = delete_key

    def ready(self, rank: int) -> None:
        """This rank's process group is up (the service closes once every rank said so).
        Best effort: a service already gone is no reason to stop training."""
        with contextlib.suppress(StoreError, OSError):
            self._call("ready", str(rank))
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
