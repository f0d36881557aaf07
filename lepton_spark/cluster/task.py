"""What one barrier task does: find its peers, start the rendezvous (rank 0), run its rank.

The stage is ``DataFrame.mapInArrow(barrier_task(...), RESULT_SCHEMA, barrier=True)`` over one
row per rank, the same on classic Spark and on Spark Connect. In each task:

1. Every task's executor address is in ``BarrierTaskContext.getTaskInfos()`` (ordered by
   partition, the same on every task); the slot plan
   (:func:`~lepton_spark.cluster.topology.slot_plan`) follows from it.
2. Rank 0 starts Horovod's Gloo rendezvous server or, for torch.distributed (``engine``
   ``ddp``/``fsdp``), the ranks' store service, bound to its executor's address (not 0.0.0.0),
   guarded by the stage's secret and its slot addresses; an ``allGather`` hands the port to
   the others. It is the stage's only Spark barrier sync: each costs the tasks that arrive
   early a second (Spark's ``runBarrier`` looks for the answer once a second).
3. Each task runs ``fn(RankContext)`` in a child process (:mod:`lepton_spark.cluster.child`) with
   the engine's environment (``HOROVOD_*``, or ``RANK``/``WORLD_SIZE``/the store's address…) and
   ``CUDA_VISIBLE_DEVICES`` from the GPUs Spark assigned it,
   and watches it: a child that stops moving for ``stall_timeout_s`` is stopped by its own task,
   whether or not the driver hears the rank's heartbeats.
4. Rank 0's task stops the rendezvous server once its rank is done and every rank has said its
   engine is up (:meth:`~lepton_spark.cluster.startup.StartupServer.settle`; at once when
   anything failed, or when no engine was used), and each task returns its rank's pickled
   result as rows of at most ``CHUNK_BYTES``.

A rank that fails reports :class:`~lepton_spark.events.RankFailed` and makes its task raise with
the rank, host and error; Spark then fails the whole stage.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lepton_spark.cluster.channel import ENV_VAR, EventClient
from lepton_spark.cluster.child import Watch, run_child
from lepton_spark.cluster.horovod import RendezvousService, horovod_env, rendezvous_address
from lepton_spark.cluster.topology import Slot, interface_for, slot_plan
from lepton_spark.cluster.torchdist import StoreService, torch_env
from lepton_spark.errors import BarrierError, InputError, StallError
from lepton_spark.events import Event, RankFailed, Rendezvous

RESULT_SCHEMA = "rank int, part int, data binary"
CHUNK_BYTES = 4 << 20  # a result row stays far below Arrow batch and gRPC message limits
SETTLE_S = 10.0  # the most rank 0's task waits, its rank done, for the others' "engine is up"


@dataclass(frozen=True)
class RankContext:
    """What ``fn`` receives: its slot, its GPUs, the CPUs Spark gave its task
    (``spark.task.cpus``), and a way to report to the driver."""

    slot: Slot
    gpus: tuple[str, ...] = ()
    cpus: int | None = None
    report: Callable[[Event], None] | None = field(default=None, compare=False)

    @property
    def rank(self) -> int:
        return self.slot.rank


@dataclass(frozen=True)
class TaskSettings:
    """What every task of one stage is told (picklable: it travels in the task's closure)."""

    events: str | None  # the driver's event channel, host:port:key
    gloo_timeout_s: int
    watch: Watch | None = None  # the task's own bound on a rank that stops moving
    # The stage's rendezvous secret, made by the driver; travels only inside the task.
    rendezvous_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    engine: str = "horovod"  # train.backend: horovod's rendezvous, or torch.distributed's store
    warm_ranks: bool = True  # fork the rank from the executor's warm process (cluster/warm.py)


def result_rows(rank: int, payload: bytes) -> pa.RecordBatch:
    """A rank's pickled result as rows ``(rank, part, data)`` of at most ``CHUNK_BYTES``."""
    parts = [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]
    return pa.RecordBatch.from_arrays(
        [
            pa.array([rank] * len(parts), pa.int32()),
            pa.array(range(len(parts)), pa.int32()),
            pa.array(parts, pa.binary()),
        ],
        names=["rank", "part", "data"],
    )


def joined_results(rows: list[Any]) -> dict[int, bytes]:
    """Rank → its pickled result, from the collected ``(rank, part, data)`` rows."""
    parts: dict[int, list[tuple[int, bytes]]] = {}
    for row in rows:
        parts.setdefault(int(row["rank"]), []).append((int(row["part"]), bytes(row["data"])))
    return {rank: b"".join(data for _, data in sorted(chunks)) for rank, chunks in parts.items()}


def barrier_task(
    payload: bytes, settings: TaskSettings
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function of the stage: one rank per partition."""

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import BarrierTaskContext

        for _ in batches:  # one row per rank: its partition number is the rank
            pass
        tc = BarrierTaskContext.get()
        rank = tc.partitionId()
        hosts = [info.address.rsplit(":", 1)[0] for info in tc.getTaskInfos()]
        host = hosts[rank]
        slots = slot_plan(hosts)
        client = EventClient(settings.events) if settings.events else None
        server = None
        horovod = settings.engine == "horovod"
        try:
            port = None
            if rank == 0:
                if horovod:
                    server = RendezvousService(host, slots, settings.rendezvous_secret)
                    port = server.address[1]
                else:
                    server = StoreService(host, slots, settings.rendezvous_secret)
                    port = server.address[1]
                if client:
                    client.send(Rendezvous(host=host, port=port))
            port = json.loads(tc.allGather(json.dumps({"port": port}))[0])["port"]
            gpus = tuple(tc.resources()["gpu"].addresses) if "gpu" in tc.resources() else ()
            if horovod:
                env = horovod_env(
                    slots[rank],
                    (rendezvous_address(hosts[0], port, settings.rendezvous_secret), port),
                    interface_for(host),
                    settings.gloo_timeout_s,
                    settings.watch.stall_timeout_s if settings.watch else None,
                )
            else:
                env = torch_env(
                    slots[rank],
                    (hosts[0], port),
                    interface_for(host),
                    settings.rendezvous_secret,
                )
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            if settings.events:
                env[ENV_VAR] = settings.events
            context = RankContext(slot=slots[rank], gpus=gpus, cpus=tc.cpus())
            try:
                result = run_child(payload, context, env, settings.watch, settings.warm_ranks)
            except BarrierError as err:
                if client:
                    failed = RankFailed(
                        rank=rank,
                        error=str(err),
                        input_error=isinstance(err, InputError),
                        stalled=isinstance(err, StallError),
                    )
                    client.send(failed)
                raise
            if server is not None:
                server.settle(SETTLE_S)  # the other ranks' start-up is over
        finally:
            if server is not None:
                server.stop()
            if client is not None:
                client.close()
        yield result_rows(rank, result)

    return task
