"""A server that lives only for a barrier stage's start-up (Horovod's rendezvous, the
torch.distributed store): served on a thread of rank 0's task, closed by itself once every rank
is connected, or by the task when its rank is done (:meth:`StartupServer.settle`, then
:meth:`StartupServer.stop`)."""

from __future__ import annotations

import logging
import socketserver
import threading
import time

log = logging.getLogger(__name__)
# How often a serving loop looks for ``shutdown``: socketserver's default, 0.5 s, is what a close
# waits at worst, and the last rank's start-up answer waits on that close.
SHUTDOWN_POLL_S = 0.02


class StartupServer:
    """Serves ``httpd`` until every rank is in (:meth:`close_soon`) or :meth:`stop`."""

    def __init__(self, httpd: socketserver.BaseServer, name: str) -> None:
        self._httpd = httpd
        self._name = name
        self._closed = threading.Event()
        self._some_in = threading.Event()  # a rank has said it is connected
        self._stopping = threading.Lock()
        self._started = time.monotonic()
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(SHUTDOWN_POLL_S,), name=name, daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]  # type: ignore[misc]
        return str(host), int(port)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def rank_in(self) -> None:
        """A rank has said it is connected (its engine is up): the stage uses this server, and
        the others are at most moments behind (:meth:`settle`)."""
        self._some_in.set()

    def settle(self, timeout_s: float) -> bool:
        """Rank 0's own rank is done: let the others finish their start-up before the task stops
        the server. A rank says it is connected only once its engine is up, which takes every
        rank, so once one has said it the others are moments from saying it too: wait for the
        port to close itself (every rank in), at most ``timeout_s``. When no rank has said it,
        nothing uses the server (a function without an engine, or one calling ``hvd.init()``
        itself: Horovod's init returns on rank 0 only once every rank is done with the
        rendezvous): no wait. Whether every rank came in."""
        if not self._some_in.is_set():
            return self.closed
        if self._closed.wait(timeout_s):
            return True
        log.warning(
            "%s: not every rank said it was connected within %.0f s of rank 0's end; closing",
            self._name,
            timeout_s,
        )
        return False

    def close_soon(self) -> None:
        """Every rank is connected: close the port, from another thread (returns at once)."""
        self._all_in()
        threading.Thread(target=self.stop, name=f"{self._name}-close", daemon=True).start()

    def close_now(self) -> None:
        """Every rank is connected: close the port before returning. A handler thread calls it
        before it answers the last rank, so that no rank goes on (to training, whose first
        step needs every rank) while the port is still open; never from the serving thread
        (``shutdown`` waits for it), and only with daemon handler threads (not joined)."""
        self._all_in()
        self.stop()

    def _all_in(self) -> None:
        log.info(
            "%s: every rank is connected after %.1f s; closing its port",
            self._name,
            time.monotonic() - self._started,
        )

    def stop(self) -> None:
        """Stop serving and close the port; never waits on a client (idempotent, thread-safe).
        :attr:`closed` turns true only once the listening socket is closed: a connect after it
        is refused."""
        with self._stopping:
            if self._closed.is_set():
                return
            self._httpd.shutdown()
            self._httpd.server_close()
            self._closed.set()
        self._thread.join(timeout=5)
