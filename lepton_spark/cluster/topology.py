"""Where the ranks are: one slot per barrier task, counted per host as ``horovodrun`` would.

Every task reads all the tasks' executor addresses (``BarrierTaskContext.getTaskInfos()``);
:func:`slot_plan` turns the list of hosts into ranks, local ranks and cross ranks, the same on
every task. No Spark.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil

from lepton_spark.errors import BarrierError


@dataclass(frozen=True)
class Slot:
    """One rank's place in the job, as Horovod needs it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    host: str


def slot_plan(hosts: list[str]) -> list[Slot]:
    """Slots for ranks ``0..len(hosts)-1`` where rank ``r`` runs on ``hosts[r]``.

    Local rank counts the ranks before it on the same host; cross rank is the host's position among
    the hosts that have a rank with the same local rank.
    """
    order: list[str] = list(dict.fromkeys(hosts))
    local_rank: list[int] = []
    seen: dict[str, int] = {}
    for h in hosts:
        local_rank.append(seen.get(h, 0))
        seen[h] = local_rank[-1] + 1
    slots = []
    for r, h in enumerate(hosts):
        peers = [hh for hh in order if seen[hh] > local_rank[r]]
        slots.append(
            Slot(
                rank=r,
                size=len(hosts),
                local_rank=local_rank[r],
                local_size=seen[h],
                cross_rank=peers.index(h),
                cross_size=len(peers),
                host=h,
            )
        )
    return slots


def interface_for(address: str) -> str:
    """The network interface that holds ``address`` (Gloo binds to it)."""
    ip = socket.gethostbyname(address)
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    if ipaddress.ip_address(ip).is_loopback:
        return "lo"
    raise BarrierError(f"no network interface holds {address} ({ip}); set spark.driver.host?")


def slot_addresses(slots: list[Slot]) -> set[str]:
    """The addresses a stage's slots connect from: each slot's host as Spark names it, and the
    IP addresses it resolves to (Spark may name executors by hostname; a peer is seen by IP)."""
    addresses = {s.host for s in slots}
    for host in list(addresses):
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            continue
        addresses.update(str(info[4][0]) for info in infos)
    return addresses
