"""What one barrier task does: find its peers, start the rendezvous (rank 0), run its rank.

1. ``BarrierTaskContext.allGather`` shares every task's executor address; the slot plan
   (:func:`~lepton_spark.cluster.topology.slot_plan`) follows from it, the same on every task.
2. Rank 0 starts Horovod's Gloo rendezvous server bound to its executor's address (not 0.0.0.0),
   and a second ``allGather`` hands its port to the others.
3. Each task runs ``fn(RankContext)`` in a child process (:mod:`lepton_spark.cluster.child`) with
   the ``HOROVOD_*`` environment and ``CUDA_VISIBLE_DEVICES`` from the GPUs Spark assigned it.
4. A final barrier, then rank 0 stops the rendezvous server (also when anything failed).

A rank that fails reports :class:`~lepton_spark.events.RankFailed` and makes its task raise with
the rank, host and error; Spark then fails the whole stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lepton_spark.cluster.channel import ENV_VAR, EventClient
from lepton_spark.cluster.child import run_child
from lepton_spark.cluster.horovod import RendezvousService, horovod_env
from lepton_spark.cluster.topology import Slot, interface_for, slot_plan
from lepton_spark.errors import BarrierError, InputError
from lepton_spark.events import Event, RankFailed, Rendezvous


@dataclass(frozen=True)
class RankContext:
    """What ``fn`` receives: its slot, its GPUs, and a way to report to the driver."""

    slot: Slot
    gpus: tuple[str, ...] = ()
    report: Callable[[Event], None] | None = field(default=None, compare=False)

    @property
    def rank(self) -> int:
        return self.slot.rank


@dataclass(frozen=True)
class TaskSettings:
    """What every task of one stage is told (picklable: it travels in the task's closure)."""

    events: str | None  # the driver's event channel, host:port:token
    gloo_timeout_s: int


def barrier_task(payload: bytes, settings: TaskSettings) -> Callable[[Iterator[Any]], Iterator]:
    """The ``mapPartitions`` function of the stage: one rank per partition."""

    def task(_: Iterator[Any]) -> Iterator[bytes]:
        from pyspark import BarrierTaskContext

        tc = BarrierTaskContext.get()
        rank = tc.partitionId()
        host = tc.getTaskInfos()[rank].address.rsplit(":", 1)[0]
        hosts = [json.loads(m)["host"] for m in tc.allGather(json.dumps({"host": host}))]
        slots = slot_plan(hosts)
        client = EventClient(settings.events) if settings.events else None
        server = None
        try:
            if rank == 0:
                server = RendezvousService(host, slots)
                if client:
                    rdv_host, rdv_port = server.address
                    client.send(Rendezvous(host=rdv_host, port=rdv_port))
            message = json.dumps({"port": server.address[1] if server else None})
            port = json.loads(tc.allGather(message)[0])["port"]
            gpus = tuple(tc.resources()["gpu"].addresses) if "gpu" in tc.resources() else ()
            env = horovod_env(
                slots[rank], (hosts[0], port), interface_for(host), settings.gloo_timeout_s
            )
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            if settings.events:
                env[ENV_VAR] = settings.events
            try:
                result = run_child(payload, RankContext(slot=slots[rank], gpus=gpus), env)
            except BarrierError as err:
                if client:
                    client.send(
                        RankFailed(
                            rank=rank, error=str(err), input_error=isinstance(err, InputError)
                        )
                    )
                raise
            tc.barrier()  # everyone is done with the rendezvous server
        finally:
            if server is not None:
                server.stop()
            if client is not None:
                client.close()
        yield result

    return task
