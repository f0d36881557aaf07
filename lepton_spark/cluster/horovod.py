"""Horovod's part of the barrier stage: its environment for a slot, and its Gloo rendezvous server.

Rank 0's task starts :class:`RendezvousService` bound to its executor's address (never 0.0.0.0)
for the stage; every rank's child process gets :func:`horovod_env`, which ``hvd.init()`` reads.
"""

from __future__ import annotations

import threading

from lepton_spark.cluster.topology import Slot


def horovod_env(slot: Slot, rendezvous: tuple[str, int], iface: str, timeout_s: int) -> dict:
    return {
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
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }


class RendezvousService:
    """Horovod's Gloo rendezvous HTTP server, bound to one address, for one stage."""

    def __init__(self, host: str, slots: list[Slot]) -> None:
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        self._httpd = RendezvousHTTPServer((host, 0), RendezvousHandler, 0)
        self._httpd.init(
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
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="horovod-rendezvous", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
