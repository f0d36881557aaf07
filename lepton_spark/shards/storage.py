"""Where shard folders live: a local path or any ``pyarrow.fs`` URI (``file://``, ``hdfs://``, ``s3://``).

The few file operations the data path needs, written once against ``pyarrow.fs`` so that local
disks, HDFS and object stores go through the same code. No Spark, no MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from lepton_spark.errors import PathError, path_error


@dataclass(frozen=True)
class Location:
    """A folder or file on some filesystem: ``fs`` and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str = ""  # how a user names this place (the path itself when local)

    def __post_init__(self) -> None:
        if not self.uri:
            object.__setattr__(self, "uri", self.path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> Location:
        # A URI's query (``s3://b/p?endpoint_override=…``) stays at the end.
        base, sep, query = self.uri.partition("?")
        return Location(
            self.fs,
            "/".join([self.path.rstrip("/"), *parts]),
            "/".join([base.rstrip("/"), *parts]) + sep + query,
        )

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File or info.size is None:
            raise FileNotFoundError(self.uri)
        return int(info.size)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_text_atomic(self, text: str) -> None:
        self.write_bytes_atomic(text.encode())

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write a file so that readers see the old content or the new, never a part.

        A temporary sibling is written and moved over the target: a rename on local disks and
        HDFS; on object stores a single object write is atomic by itself.
        """
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path)
        except BaseException:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    def sha256(self, chunk: int = 8 << 20) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    def open_for_reading(self) -> pa.NativeFile:
        """A random-access handle: memory-mapped when local (zero copy), else a remote file."""
        if self.is_local:
            return pa.memory_map(self.path, "r")
        return self.fs.open_input_file(self.path)

    def subfolders(self) -> list[str]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete_folder(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)


def check_writable(folder: Path, where: str) -> None:
    """``folder`` (a local path, made later by whoever writes there) can be made and written: it
    is tried, not guessed from permissions (root passes every permission check, and ``/proc``,
    ``/sys`` or a read-only mount refuse what the permissions allow). The missing folders are
    made, a probe file is written in ``folder`` and removed, and the folders made are removed
    again: nothing is left behind. ``where`` names the field or option in the
    :class:`~lepton_spark.errors.PathError` (or, for a full or failing disk, the
    :class:`~lepton_spark.errors.StorageError`)."""
    folder = Path(os.path.abspath(folder))
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(f"{where} {folder} cannot be made: {existing} is not a folder")
    missing = []
    for path in (folder, *folder.parents):
        if path == existing:
            break
        missing.append(path)
    made: list[Path] = []
    doing = "made"
    try:
        for path in reversed(missing):
            _make(path, made)
        doing = "written"
        probe = folder / f".lepton-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as err:
        error = path_error(err, where, folder)
        if isinstance(error, PathError):  # say which step and where it failed
            at = err.filename if doing == "made" and err.filename else folder
            at = f" ({at})" if Path(at) != folder else ""
            error = PathError(f"{where} {folder} cannot be {doing}: {err.strerror or err}{at}")
        raise error from None
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):  # another process has begun to use it: it stays
                path.rmdir()


def _make(path: Path, made: list[Path]) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():  # made by someone else meanwhile, and not a folder
            raise
        return
    made.append(path)


def locate(where: str | Path | Location) -> Location:
    """A :class:`Location` for a local path (relative paths made absolute) or a URI."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if "://" in text:
        filesystem, path = pafs.FileSystem.from_uri(text)
        if isinstance(filesystem, pafs.LocalFileSystem):
            return Location(filesystem, path)
        return Location(filesystem, path, text)
    return Location(pafs.LocalFileSystem(), str(Path(text).resolve()))
