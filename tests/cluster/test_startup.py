"""The start-up servers' port is closed by the time they say ``closed``."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest

from lepton_spark.cluster.startup import StartupServer
from tests.helpers import wait_until


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        if line == b"close\n":  # the last rank's ready call: closed before it is answered
            self.server.lepton_close()  # type: ignore[attr-defined]
        self.wfile.write(line)


@pytest.mark.parametrize("how", ["close_soon", "close_now", "stop"])
def test_its_port_refuses_connections_once_closed(how):
    for attempt in range(50):
        httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        httpd.daemon_threads = True
        server = StartupServer(httpd, f"test-{attempt}")
        httpd.lepton_close = server.close_now  # type: ignore[attr-defined]
        address = server.address
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"hello\n")
            assert client.makefile("rb").readline() == b"hello\n"
        if how == "close_now":  # from a handler thread, as the servers' handlers do
            with socket.create_connection(address, timeout=10) as client:
                client.sendall(b"close\n")
                assert client.makefile("rb").readline() == b"close\n"
            assert server.closed, attempt  # by the time the client heard back
        elif how == "close_soon":
            server.close_soon()  # from another thread, as a handler does
            assert wait_until(lambda s=server: s.closed, 30, interval=0.001), attempt
        else:
            server.stop()
            assert server.closed
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=5).close()
        server.stop()  # idempotent
        assert server.closed


def _server(name: str) -> StartupServer:
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    httpd.daemon_threads = True
    return StartupServer(httpd, name)


def test_settle_waits_for_the_other_ranks_once_one_said_it_is_connected():
    unused = _server("settle-unused")  # no rank ever said it: a function without an engine
    started = time.monotonic()
    assert unused.settle(60) is False
    assert time.monotonic() - started < 10  # no wait for what will never come
    unused.stop()

    in_use = _server("settle-in-use")
    in_use.rank_in()
    threading.Timer(0.3, in_use.close_now).start()  # the last rank's "connected"
    assert in_use.settle(60) is True
    assert in_use.closed

    missing = _server("settle-missing")  # one rank's "connected" never comes
    missing.rank_in()
    started = time.monotonic()
    assert missing.settle(0.5) is False
    assert time.monotonic() - started >= 0.5
    assert not missing.closed  # the task stops it next
    missing.stop()
    assert missing.closed
