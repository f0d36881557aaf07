"""Training checkpoints: where a run stands, written atomically by rank 0, read back safely.

A checkpoint holds the model's and optimizer's state, the learning-rate schedule's state, the
position (epoch, batches done in it, global step) and the metrics history so far. The loader's
order is a pure function of the seed and the epoch, so the position is all it needs to carry on
from the same batch. ``checkpoint.pt`` is written whole or not at all (temporary file, then a
move) into the run's checkpoint folder (a path or a ``pyarrow.fs`` URI), and read with
``torch.load(weights_only=True)``: tensors and plain values only, never arbitrary pickled objects.

Every engine writes the same record. Horovod and DDP put the whole model and optimizer state in
it; FSDP leaves them out and names instead a ``sharded-*`` subfolder written before it by
``torch.distributed.checkpoint`` (each rank its own part, rank 0 the metadata), which any number
of ranks can load. A sharded folder is complete before the record naming it is written, and the
older ones go after: a failure mid-save leaves the previous checkpoint whole. On an object store
each rank writes its part to a local folder first and copies it up
(:func:`staged_sharded`, :func:`fetched_sharded`). No Spark, no MLflow.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from lepton_spark.shards.storage import Location, locate

CHECKPOINT_NAME = "checkpoint.pt"
SHARDED_PREFIX = "sharded-"  # a torch.distributed.checkpoint folder (FSDP)


@dataclass(frozen=True)
class Position:
    """Where training stands: ``step`` batches of ``epoch`` (0-based) are done."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Checkpoint:
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    size: int | None = None  # the ranks that wrote it (None: a checkpoint from before 0.3)
    sharded: str | None = None  # the subfolder holding model and optimizer state (FSDP)


def save_checkpoint(folder: str | Path | Location, checkpoint: Checkpoint) -> Location:
    """Write ``checkpoint.pt`` into ``folder`` atomically; returns where it went."""
    place = locate(folder)
    place.fs.create_dir(place.path, recursive=True)
    payload = {
        "position": [
            checkpoint.position.epoch,
            checkpoint.position.step,
            checkpoint.position.global_step,
        ],
        "model": {k: v.detach().cpu() for k, v in checkpoint.model.items()},
        "optimizer": checkpoint.optimizer,
        "schedule": checkpoint.schedule,
        # JSON text: plain values only, whatever the metrics hold.
        "history": json.dumps(checkpoint.history),
        "size": checkpoint.size,
        "sharded": checkpoint.sharded,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    target = place.child(CHECKPOINT_NAME)
    target.write_bytes_atomic(buffer.getvalue())
    return target


def load_checkpoint(folder: str | Path | Location) -> Checkpoint | None:
    """The checkpoint in ``folder``, or ``None`` when there is none yet."""
    target = locate(folder).child(CHECKPOINT_NAME)
    if not target.is_file():
        return None
    payload = torch.load(io.BytesIO(target.read_bytes()), weights_only=True, map_location="cpu")
    epoch, step, global_step = (int(v) for v in payload["position"])
    return Checkpoint(
        position=Position(epoch, step, global_step),
        model=payload["model"],
        optimizer=payload["optimizer"],
        schedule=payload["schedule"],
        history=json.loads(payload["history"]),
        size=payload.get("size"),
        sharded=payload.get("sharded"),
    )


def sharded_location(folder: str | Path | Location, name: str) -> Location:
    if not name.startswith(SHARDED_PREFIX) or "/" in name:
        raise ValueError(f"not a sharded checkpoint's name: {name!r}")
    return locate(folder).child(name)


@contextlib.contextmanager
def staged_sharded(folder: str | Path | Location, name: str) -> Iterator[str]:
    """A local folder for this rank's part of the sharded checkpoint ``name``: the folder
    itself on a local disk; elsewhere a temporary one, copied up when the block ends."""
    place = sharded_location(folder, name)
    if place.is_local:
        Path(place.path).mkdir(parents=True, exist_ok=True)
        yield place.path
        return
    local = tempfile.mkdtemp(prefix="lepton-dcp-")
    try:
        yield local
        place.fs.create_dir(place.path, recursive=True)
        pafs.copy_files(
            local,
            place.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=place.fs,
        )
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def fetched_sharded(folder: str | Path | Location, name: str) -> Iterator[str]:
    """The sharded checkpoint ``name`` as a local folder (copied down from an object store)."""
    place = sharded_location(folder, name)
    if not place.exists():
        raise FileNotFoundError(f"the sharded checkpoint {place.uri} named by the record is gone")
    if place.is_local:
        yield place.path
        return
    local = tempfile.mkdtemp(prefix="lepton-dcp-")
    try:
        pafs.copy_files(
            place.path,
            local,
            source_filesystem=place.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def remove_sharded(folder: str | Path | Location, keep: str | None) -> None:
    """Every sharded checkpoint in ``folder`` but ``keep`` (older ones, or parts a failed save
    left)."""
    place = locate(folder)
    for name in place.subfolders():
        if name.startswith(SHARDED_PREFIX) and name != keep:
            place.child(name).delete_folder()


# -- reading a sharded checkpoint without unpickling arbitrary objects -------------------------

# What torch.distributed.checkpoint's ``.metadata`` pickle holds (torch 2.13, FileSystemWriter):
# its metadata classes, torch's sizes, dtypes and layouts, the file names.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a checkpoint's metadata is made of (and torch's dtypes): a
    ``.metadata`` that names anything else is refused, not run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"a sharded checkpoint's metadata may not hold {module}.{name}"
        )


def sharded_reader(folder: str) -> Any:
    """torch.distributed.checkpoint's reader of a local ``folder``, reading ``.metadata`` with
    :class:`_MetadataUnpickler` (torch's own reader unpickles it whole)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(folder)


def sharded_planner() -> Any:
    """torch.distributed.checkpoint's load planner, reading the non-tensor values (the
    optimizer's param groups) with ``torch.load(weights_only=True)`` (torch's own: False)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                path = self.mappings[read_item.dest_index.fqn]
                set_element(self.original_state_dict, path, loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Planner()
