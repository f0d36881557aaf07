"""The data-parallel engines a rank trains with: Horovod, DDP and FSDP behind one small interface.

``train.backend`` picks one (:func:`start_engine`). The rank loop and k-means speak to an
:class:`Engine` only, in Horovod's words (``rank()``, ``size()``, ``broadcast``, ``allreduce``,
``allgather``), and let it decide the three things that differ between engines:

* how the model and optimizer are wrapped (:meth:`Engine.wrap`): Horovod's
  ``DistributedOptimizer``; DDP's ``DistributedDataParallel``; FSDP2's ``fully_shard`` over the
  model's blocks (each rank holds 1/N of the parameters, gradients and optimizer state);
* how one optimizer step goes (:meth:`Engine.step`, gradient scaling included), and how
  gradients accumulate without a sync in between (:meth:`Engine.accumulating`,
  ``train.accumulate_steps``); gradients may travel in 16 bits (``train.compression``);
* how the state goes into a checkpoint and back: whole on rank 0 for Horovod and DDP
  (:meth:`Engine.model_state`, :meth:`Engine.optimizer_state`, :meth:`Engine.load_state`); for
  FSDP each rank's part through ``torch.distributed.checkpoint`` (:meth:`Engine.save_sharded`,
  :meth:`Engine.load_sharded`). Either resumes at any number of ranks. The trained model is
  gathered whole on rank 0 in every engine.

Collectives never unpickle: tensors only. Under Spark the barrier task sets the environment
(``HOROVOD_*`` for Horovod; ``RANK``/``WORLD_SIZE`` and the guarded store's address for
torch.distributed, :mod:`lepton_spark.training.store`); under a launcher of the user's own
(``torchrun``: ``MASTER_ADDR``), torch's ``env://``; with none, an engine is one rank of one.
No Spark, no MLflow.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lepton_spark.config import TrainConfig
from lepton_spark.errors import InputError
from lepton_spark.training.checkpoint import sharded_planner, sharded_reader
from lepton_spark.training.devices import choose_device
from lepton_spark.training.store import GuardedStore

log = logging.getLogger(__name__)

BACKENDS = ("horovod", "ddp", "fsdp")

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Engine:
    """One rank's view of its engine. Subclasses implement the collectives and the wrapping."""

    name = "engine"
    Sum = "sum"  # the op of allreduce, as Horovod spells it

    def rank(self) -> int:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def local_rank(self) -> int:
        raise NotImplementedError

    def local_size(self) -> int:
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, root_rank: int = 0, name: str = "") -> torch.Tensor:
        raise NotImplementedError

    def allreduce(self, tensor: torch.Tensor, op: Any = None, name: str = "") -> torch.Tensor:
        """The sum over the ranks (the only op the project uses)."""
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor, name: str = "") -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0, in rank order (sizes may differ)."""
        raise NotImplementedError

    def wrap(
        self, model: nn.Module, make_optimizer: MakeOptimizer, device: torch.device
    ) -> tuple[nn.Module, Any]:
        """The model (on ``device``) and its optimizer, ready for data-parallel steps."""
        raise NotImplementedError

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module) -> Iterator[None]:
        """Backward passes in here add to the gradients without syncing them (Horovod counts
        its ``backward_passes_per_step`` itself)."""
        yield

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        """A backward pass of a micro-batch that is not the last of its step."""
        (loss if scaler is None else scaler.scale(loss)).backward()

    def step(self, loss: torch.Tensor, optimizer: Any, scaler: torch.amp.GradScaler | None):
        """Backward (gradients averaged over the ranks) and the optimizer's step."""
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict, on rank 0 (collective: every rank calls it)."""
        return _inner(model).state_dict()

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer's whole state, on rank 0 (collective: every rank calls it)."""
        return optimizer.state_dict()

    def load_state(
        self,
        model: nn.Module,
        optimizer: Any,
        model_state: dict[str, torch.Tensor] | None,
        optimizer_state: dict[str, Any] | None,
    ) -> None:
        """Rank 0's states (``None`` elsewhere, and on every rank when there is nothing to
        resume) into every rank's model and optimizer; with nothing given, rank 0's parameters
        to all. Collective."""
        resuming = self.allreduce(torch.tensor([float(model_state is not None)]), name="resuming")
        if float(resuming[0]) > 0:
            if self.rank() == 0:
                assert model_state is not None and optimizer_state is not None
                _inner(model).load_state_dict(model_state)
                optimizer.load_state_dict(optimizer_state)
                buffer = io.BytesIO()
                torch.save(optimizer_state, buffer)
                payload = broadcast_bytes(self, buffer.getvalue(), name="optimizer")
            else:
                payload = broadcast_bytes(self, b"", name="optimizer")
                optimizer.load_state_dict(torch.load(io.BytesIO(payload), weights_only=True))
        self.broadcast_parameters(_inner(model).state_dict())

    def broadcast_parameters(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            value.data.copy_(self.broadcast(value.data, 0, name=key))

    def shards_state(self) -> bool:
        """Whether checkpoints keep the model and optimizer state as each rank's part
        (:meth:`save_sharded`, FSDP) rather than whole on rank 0 (:meth:`model_state`)."""
        return False

    def save_sharded(self, model: nn.Module, optimizer: Any, folder: str) -> None:
        """Every rank writes its part of the state into the local ``folder`` (collective)."""
        raise NotImplementedError

    def load_sharded(self, model: nn.Module, optimizer: Any, folder: str) -> None:
        """The state in a sharded checkpoint ``folder`` into every rank's part (collective)."""
        raise InputError(
            f"this run's checkpoint is sharded (written by train.backend 'fsdp'); "
            f"train.backend {self.name!r} cannot resume it"
        )

    def shard_evaluation(self) -> bool:
        """Whether every forward pass is a collective (FSDP): the ranks must then run as many."""
        return False

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The module validation runs: DDP's inner one (its forward would sync buffers, a
        collective, and ranks run different numbers of validation batches)."""
        return _inner(model)

    def shutdown(self, clean: bool = True) -> None:
        """Leave the engine; ``clean``: every rank got here without an error (a failing rank
        must not wait in a collective its peers never join)."""
        raise NotImplementedError


class HorovodEngine(Engine):
    """Horovod (Gloo on CPU, NCCL on GPU): ``hvd.DistributedOptimizer`` averages the gradients."""

    name = "horovod"

    def __init__(self, hvd: Any, cfg: TrainConfig | None = None) -> None:
        self.hvd = hvd
        self.Sum = hvd.Sum
        self.accumulate = cfg.accumulate_steps if cfg is not None else 1
        fp16 = cfg is not None and cfg.compression == "fp16"
        self.compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none

    def rank(self) -> int:
        return int(self.hvd.rank())

    def size(self) -> int:
        return int(self.hvd.size())

    def local_rank(self) -> int:
        return int(self.hvd.local_rank())

    def local_size(self) -> int:
        return int(self.hvd.local_size())

    def broadcast(self, tensor: torch.Tensor, root_rank: int = 0, name: str = "") -> torch.Tensor:
        return self.hvd.broadcast(tensor, root_rank, name=name or None)

    def allreduce(self, tensor: torch.Tensor, op: Any = None, name: str = "") -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name or None)

    def allgather(self, tensor: torch.Tensor, name: str = "") -> torch.Tensor:
        return self.hvd.allgather(tensor, name=name or None)

    def wrap(
        self, model: nn.Module, make_optimizer: MakeOptimizer, device: torch.device
    ) -> tuple[nn.Module, Any]:
        model = model.to(device)
        optimizer = self.hvd.DistributedOptimizer(
            make_optimizer(model.parameters()),
            named_parameters=model.named_parameters(),
            backward_passes_per_step=self.accumulate,
            compression=self.compression,
        )
        return model, optimizer

    def step(self, loss: torch.Tensor, optimizer: Any, scaler: torch.amp.GradScaler | None):
        if scaler is None:
            super().step(loss, optimizer, None)
            return
        # Horovod's recipe: allreduce, unscale, then step without a second allreduce.
        scaler.scale(loss).backward()
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()

    def broadcast_parameters(self, state: dict[str, torch.Tensor]) -> None:
        self.hvd.broadcast_parameters(state, root_rank=0)

    def shutdown(self, clean: bool = True) -> None:
        self.hvd.shutdown()


class TorchEngine(Engine):
    """``torch.distributed`` (gloo on the CPU, NCCL on GPUs) with DDP; :class:`FsdpEngine`
    shards the model instead."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.mixed_precision = cfg.mixed_precision
        self.compression = cfg.compression
        self._local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.device = choose_device(cfg.device, self._local_rank)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        # torch bounds every collective by it, not only the rendezvous: a rank checksumming its
        # shards or rank 0 writing a checkpoint may keep the others waiting that long (the
        # stall watch bounds a real hang).
        timeout = datetime.timedelta(seconds=max(cfg.gloo_timeout_s, cfg.stall_timeout_s))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        store = GuardedStore.from_env(timeout)
        if store is not None:  # a barrier stage: rank 0's task serves the store
            dist.init_process_group(
                backend,
                store=store,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=timeout,
                # NCCL connects now, not at the first collective: the store closes below.
                device_id=self.device if self.device.type == "cuda" else None,
            )
            self._groups()  # every process group the engine needs, while the store is open
            dist.barrier()  # every rank's connections are made: the store may close
            store.ready(self.rank())
        elif "MASTER_ADDR" in os.environ:  # a launcher of the user's own (torchrun)
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
            self._groups()
        else:  # one rank of one, no Spark: nothing to connect to
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._groups()
        log.info(
            "rank %d of %d: torch.distributed %s (%s)", self.rank(), self.size(), backend, self.name
        )

    def _groups(self) -> None:
        """Make the process groups beyond the default one (they meet through the store)."""

    def rank(self) -> int:
        return int(self.dist.get_rank())

    def size(self) -> int:
        return int(self.dist.get_world_size())

    def local_rank(self) -> int:
        return self._local_rank

    def local_size(self) -> int:
        return self._local_size

    def _on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy where the process group's backend takes it (NCCL: the GPU)."""
        return tensor.detach().clone().to(self.device).contiguous()

    def broadcast(self, tensor: torch.Tensor, root_rank: int = 0, name: str = "") -> torch.Tensor:
        wire = self._on_wire(tensor)
        self.dist.broadcast(wire, src=root_rank)
        return wire.to(tensor.device)

    def allreduce(self, tensor: torch.Tensor, op: Any = None, name: str = "") -> torch.Tensor:
        wire = self._on_wire(tensor)
        self.dist.all_reduce(wire, op=self.dist.ReduceOp.SUM)
        return wire.to(tensor.device)

    def allgather(self, tensor: torch.Tensor, name: str = "") -> torch.Tensor:
        size = self.size()
        rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(rows) for _ in range(size)]
        self.dist.all_gather(counts, rows)
        most = int(max(int(c[0]) for c in counts))
        padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
        padded[: tensor.shape[0]] = tensor.to(self.device)
        parts = [torch.zeros_like(padded) for _ in range(size)]
        self.dist.all_gather(parts, padded)
        joined = torch.cat([p[: int(c[0])] for p, c in zip(parts, counts, strict=True)])
        return joined.to(tensor.device)

    def wrap(
        self, model: nn.Module, make_optimizer: MakeOptimizer, device: torch.device
    ) -> tuple[nn.Module, Any]:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model.to(device), device_ids=ids)
        if self.compression != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = {
                "fp16": default_hooks.fp16_compress_hook,
                "bf16": default_hooks.bf16_compress_hook,
            }
            model.register_comm_hook(None, hook[self.compression])
        return model, make_optimizer(model.parameters())

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module) -> Iterator[None]:
        with model.no_sync():  # type: ignore[operator]
            yield

    def shutdown(self, clean: bool = True) -> None:
        if self.dist.is_initialized():
            if clean:
                self.dist.barrier()  # no rank leaves while another still talks to it
            self.dist.destroy_process_group()


class FsdpEngine(TorchEngine):
    """``torch.distributed`` with FSDP2: each rank holds 1/N of the parameters, gradients and
    optimizer state. Checkpoints keep each rank's part (``torch.distributed.checkpoint``); the
    trained model is gathered whole for rank 0; a whole-state checkpoint of an older version is
    spread back from rank 0."""

    name = "fsdp"

    def _groups(self) -> None:
        # FSDP's mesh, made now: left to fully_shard, torch may make a new process group for it
        # (a GPU host with a gloo group) after the stage's store has closed.
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.size(),))

    def wrap(
        self, model: nn.Module, make_optimizer: MakeOptimizer, device: torch.device
    ) -> tuple[nn.Module, Any]:
        model = _fully_shard(model.to(device), self.mixed_precision, self.mesh)
        return model, make_optimizer(model.parameters())

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full())

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full())

    def load_state(
        self,
        model: nn.Module,
        optimizer: Any,
        model_state: dict[str, torch.Tensor] | None,
        optimizer_state: dict[str, Any] | None,
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        resuming = self.allreduce(torch.tensor([float(model_state is not None)]), name="resuming")
        if float(resuming[0]) == 0:
            return  # every rank built the same seeded model: its shards already agree
        options = _full(broadcast=True)
        set_model_state_dict(model, model_state or {}, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state or {}, options=options)

    def shards_state(self) -> bool:
        return True

    def save_sharded(self, model: nn.Module, optimizer: Any, folder: str) -> None:
        """``torch.distributed.checkpoint``: each rank writes its own shards, rank 0 the
        metadata; no rank ever holds the whole state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)

    def load_sharded(self, model: nn.Module, optimizer: Any, folder: str) -> None:
        """Each rank reads the parts of the checkpoint its shards need, whatever the number of
        ranks that wrote it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, storage_reader=sharded_reader(folder), planner=sharded_planner())
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )

    def shard_evaluation(self) -> bool:
        return True

    def evaluated(self, model: nn.Module) -> nn.Module:
        return model  # every forward is a collective: the wrapped model on every rank


def start_engine(cfg: TrainConfig) -> Engine:
    """The engine ``cfg.backend`` names, initialised from the environment the stage set."""
    _check_stage(cfg.backend)
    if cfg.backend == "horovod":
        try:
            import horovod.torch as hvd
        except ImportError as err:
            raise InputError(
                f"train.backend is 'horovod' but horovod is not installed here ({err}): build it "
                "with scripts/install_horovod.sh (make setup does), or set train.backend to "
                "'ddp' or 'fsdp' (torch.distributed, nothing to build)"
            ) from err
        # Set before hvd.init(); a value already in the environment (a user's) wins.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cfg.horovod_cycle_time_ms))
        hvd.init()
        return HorovodEngine(hvd, cfg)
    if cfg.backend == "ddp":
        return TorchEngine(cfg)
    if cfg.backend == "fsdp":
        return FsdpEngine(cfg)
    raise InputError(f"train.backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")


def _check_stage(backend: str) -> None:
    """A stage set up for one engine and a rank asking for another would train each rank
    alone, silently: refuse it."""
    horovod = int(os.environ.get("HOROVOD_SIZE", "1")) > 1
    torch_dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (backend == "horovod" and torch_dist and not horovod) or (
        backend != "horovod" and horovod and not torch_dist
    ):
        stage = "horovod" if horovod else "torch.distributed"
        raise InputError(
            f"train.backend is {backend!r} but the barrier stage set this rank up for {stage}: "
            "the stage must be started for train.backend (run_pipeline does; a stage of your "
            "own passes BarrierSettings(engine=...))"
        )


def _fully_shard(model: nn.Module, mixed_precision: bool, mesh: Any = None) -> nn.Module:
    """FSDP2 over the model's blocks, then the model itself (what is left: embeddings, heads).

    The blocks are what the model's ``fsdp_blocks()`` returns when it has one (a user factory's
    hook), else its Transformer layers, else its Linear layers.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not any(p.numel() for p in model.parameters()):
        raise InputError(
            f"train.backend 'fsdp' shards a model's parameters; {type(model).__name__} has none "
            "(use 'ddp' or 'horovod')"
        )
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one (see :func:`_fully_shard`)."""
    hook = getattr(model, "fsdp_blocks", None)
    if callable(hook):
        return list(hook())
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    if layers:
        return layers
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def broadcast_bytes(engine: Engine, data: bytes, root_rank: int = 0, name: str = "bytes") -> bytes:
    """``data`` from ``root_rank`` to every rank, as tensors (its length, then its bytes)."""
    size = torch.tensor([len(data) if engine.rank() == root_rank else 0], dtype=torch.int64)
    size = int(engine.broadcast(size, root_rank, name=f"{name}.size")[0])
    if size == 0:
        return b""
    if engine.rank() == root_rank:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buffer = torch.zeros(size, dtype=torch.uint8)
    return bytes(engine.broadcast(buffer, root_rank, name=f"{name}.data").numpy())


def _full(broadcast: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if broadcast:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _inner(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (state dict keys without ``module.``)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
