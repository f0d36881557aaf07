"""Horovod's part of the barrier stage: its environment for a slot, and its Gloo rendezvous server.

Rank 0's task starts :class:`RendezvousService` bound to its executor's address (never 0.0.0.0),
guarded by the stage's secret and its slot addresses, and closed as soon as every rank has
initialised; every rank's child process gets :func:`horovod_env`, which ``hvd.init()`` reads.
"""

from __future__ import annotations

from lepton_spark.cluster.startup import StartupServer
from lepton_spark.cluster.topology import Slot, slot_addresses


def horovod_env(
    slot: Slot,
    rendezvous: tuple[str, int],
    iface: str,
    timeout_s: int,
    stall_timeout_s: float | None = None,
) -> dict:
    """A rank's Horovod environment: its place in the stage, the rendezvous, Gloo and NCCL on
    the one interface the slot's address is on, and (``stall_timeout_s``) Horovod's own stall
    check, which shuts a collective down that some rank never joins: a bound that holds with
    no event channel at all."""
    env = {
        "HOROVOD_RANK": str(slot.rank),
        "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank),
        "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank),
        "HOROVOD_CROSS_SIZE": str(slot.cross_size),
        "HOROVOD_HOSTNAME": slot.host,
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous[0],
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous[1]),
        "HOROVOD_GLOO_IFACE": iface,
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(timeout_s),
        "NCCL_SOCKET_IFNAME": iface,
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }
    if stall_timeout_s:
        check = max(1, int(stall_timeout_s))
        env["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(check)
        env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(2 * check)
    return env


class RendezvousService(StartupServer):
    """Horovod's Gloo rendezvous HTTP server, bound to one address, for one stage's start-up.

    It answers only the stage's slot addresses, and only requests whose path carries the
    stage's secret (``/SECRET:PORT/scope/key``: the ranks' address is ``host:port/SECRET``, which
    Horovod's HTTP store puts in front of every path; see :func:`rendezvous_address`). Anything
    else gets 403 and is counted (:attr:`refused`). Once every rank has said that its
    ``hvd.init()`` returned (:func:`lepton_spark.training.worker.tell_rendezvous_ready`: a PUT
    under ``/SECRET:PORT/lepton_ready/RANK``), the server closes itself, before it answers the
    last rank: the Gloo pairs are connected, and nothing may join them later.
    """

    def __init__(self, host: str, slots: list[Slot], secret: str) -> None:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousHTTPServer

        httpd = RendezvousHTTPServer((host, 0), _guarded_handler(), 0)
        httpd.daemon_threads = True  # a slow client never holds up a stop
        httpd.block_on_close = False
        httpd.init(
            [
                SlotInfo(
                    hostname=s.host,
                    rank=s.rank,
                    local_rank=s.local_rank,
                    cross_rank=s.cross_rank,
                    size=s.size,
                    local_size=s.local_size,
                    cross_size=s.cross_size,
                )
                for s in slots
            ]
        )
        port = httpd.server_address[1]
        httpd.lepton_prefix = f"/{secret}:{port}/"
        httpd.lepton_allowed = slot_addresses(slots)
        httpd.lepton_refused = 0
        httpd.lepton_ready = set()
        httpd.lepton_size = len(slots)
        httpd.lepton_on_done = self.close_now
        httpd.lepton_on_ready = self.rank_in
        super().__init__(httpd, "horovod-rendezvous")

    @property
    def refused(self) -> int:
        """Requests turned away: from an address not in the stage, or without its secret."""
        return int(self._httpd.lepton_refused)  # type: ignore[attr-defined]


READY_SCOPE = "lepton_ready"  # training.worker.tell_rendezvous_ready writes under it


def rendezvous_address(host: str, port: int, secret: str) -> str:
    """``HOROVOD_GLOO_RENDEZVOUS_ADDR`` carrying the stage's secret: Horovod's HTTP store builds
    ``http://{ADDR}:{PORT}/{scope}/{key}``, so every request's path starts ``/SECRET:PORT/``."""
    return f"{host}:{port}/{secret}"


def _guarded_handler() -> type:
    from horovod.runner.http.http_server import RendezvousHandler

    class Guarded(RendezvousHandler):
        def _admit(self) -> bool:
            server = self.server
            if self.client_address[0] not in server.lepton_allowed or not self.path.startswith(
                server.lepton_prefix
            ):
                server.lepton_refused += 1
                self.send_status_code(403)
                return False
            self.path = "/" + self.path[len(server.lepton_prefix) :]
            return True

        def do_GET(self) -> None:
            if self._admit():
                super().do_GET()

        def do_PUT(self) -> None:
            if not self._admit():
                return
            if self.path.startswith(f"/{READY_SCOPE}/"):  # a rank's hvd.init() returned
                server = self.server
                server.lepton_ready.add(self.path.rsplit("/", 1)[-1])
                server.lepton_on_ready()
                if len(server.lepton_ready) == server.lepton_size:
                    server.lepton_on_done()  # the port is closed before the last rank hears
                self.send_status_code(200)
                return
            super().do_PUT()

        def do_DELETE(self) -> None:
            if self._admit():
                super().do_DELETE()

        def do_POST(self) -> None:
            self.server.lepton_refused += 1
            self.send_status_code(403)

    return Guarded
