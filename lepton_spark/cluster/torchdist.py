"""torch.distributed's part of the barrier stage (``train.backend`` ``ddp`` or ``fsdp``).

Rank 0's task finds a port free on its executor's own address, and every rank's child process
gets :func:`torch_env`: ``init_process_group(init_method="env://")`` reads it, rank 0's process
serves the ``TCPStore`` on that port (torch listens on every interface of the host), and gloo
(CPU) or NCCL (GPU) bind to the interface that address is on. torch's store authenticates
nothing: see ``docs/security.md``.
"""

from __future__ import annotations

import socket

from lepton_spark.cluster.topology import Slot


def reserve_port(host: str) -> int:
    """A port free on ``host`` now (rank 0's process binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torch_env(slot: Slot, master: tuple[str, int], iface: str) -> dict[str, str]:
    """A rank's torch.distributed environment: its place in the stage, rank 0's store, and
    the interface for gloo and NCCL (the timeout comes from the rank's train config)."""
    return {
        "RANK": str(slot.rank),
        "WORLD_SIZE": str(slot.size),
        "LOCAL_RANK": str(slot.local_rank),
        "LOCAL_WORLD_SIZE": str(slot.local_size),
        "GROUP_RANK": str(slot.cross_rank),
        "MASTER_ADDR": master[0],
        "MASTER_PORT": str(master[1]),
        "GLOO_SOCKET_IFNAME": iface,
        "NCCL_SOCKET_IFNAME": iface,
    }
