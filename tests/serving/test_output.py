"""The scoring output's commit: whole or absent, the old output kept until the new one is whole,
on a filesystem that renames folders (local) and one that cannot (a pyarrow ``SubTreeFileSystem``
over a local folder stands for an object store: its type is not one that renames)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from lepton_spark.errors import ScoringError
from lepton_spark.serving.output import (
    MARKER,
    check_destination,
    commit,
    committed_uri,
    renames_folders,
)
from lepton_spark.shards.storage import Location, locate


def writer(values: list[int], fail: bool = False):
    """What the Spark write does: a folder of Parquet files at ``uri`` (then, maybe, a crash)."""

    def write(uri: str) -> None:
        filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (None, uri)
        if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
            Path(path).mkdir(parents=True)
            pq.write_table(pa.table({"v": values}), f"{path}/part-0.parquet")
        if fail:
            raise RuntimeError("executor lost")

    return write


def subtree(root: Path, name: str) -> Location:
    root.mkdir(exist_ok=True)
    filesystem = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    return Location(filesystem, name, name)


def subtree_writer(location: Location, values: list[int], fail: bool = False):
    def write(uri: str) -> None:
        folder = uri  # a child of the location: the same path inside the subtree
        location.fs.create_dir(folder)
        with location.fs.open_output_stream(f"{folder}/part-0.parquet") as out:
            pq.write_table(pa.table({"v": values}), out)
        if fail:
            raise RuntimeError("executor lost")

    return write


def read_values(folder: Path) -> list[int]:
    return sorted(pq.read_table(folder)["v"].to_pylist())


def test_a_local_output_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    out = locate(tmp_path / "scored")
    assert renames_folders(out)
    assert commit(writer([1, 2]), out, {"model_uri": "m"}) == out.uri
    assert read_values(tmp_path / "scored") == [1, 2]
    assert json.loads((tmp_path / "scored" / MARKER).read_text())["model_uri"] == "m"

    check_destination(out, overwrite=True)  # a previous scoring output: may be replaced
    commit(writer([3, 4, 5]), out, {})
    assert read_values(tmp_path / "scored") == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored"]


def test_a_failed_local_write_leaves_the_previous_output_as_it_was(tmp_path):
    out = locate(tmp_path / "scored")
    commit(writer([1, 2]), out, {})
    with pytest.raises(RuntimeError, match="executor lost"):
        commit(writer([9], fail=True), out, {})
    assert read_values(tmp_path / "scored") == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored"]


def test_on_a_store_without_renames_the_marker_is_the_commit(tmp_path):
    out = subtree(tmp_path / "bucket", "scored")
    assert not renames_folders(out)
    first = commit(subtree_writer(out, [1, 2]), out, {})
    assert first.startswith("scored/attempt-") and committed_uri(out) == first
    assert read_values(tmp_path / "bucket" / first) == [1, 2]

    # A crash before the marker: the previous attempt stays the output, the failed one goes.
    with pytest.raises(RuntimeError):
        commit(subtree_writer(out, [9], fail=True), out, {})
    assert committed_uri(out) == first
    assert sorted(p.name for p in (tmp_path / "bucket" / "scored").iterdir()) == [
        MARKER,
        first.split("/")[-1],
    ]

    second = commit(subtree_writer(out, [3, 4, 5]), out, {})
    assert committed_uri(out) == second != first
    assert read_values(tmp_path / "bucket" / second) == [3, 4, 5]
    # The older attempt is removed only after the marker named the new one.
    assert sorted(p.name for p in (tmp_path / "bucket" / "scored").iterdir()) == [
        MARKER,
        second.split("/")[-1],
    ]


def test_overwrite_refuses_what_is_not_a_scoring_output(tmp_path, monkeypatch):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("years of work")
    with pytest.raises(ScoringError, match="exists; --overwrite replaces it"):
        check_destination(locate(other), overwrite=False)
    with pytest.raises(ScoringError, match=f"not a lepton-spark scoring output \\(no {MARKER}\\)"):
        check_destination(locate(other), overwrite=True)

    # The working directory, or a folder above it, even one that holds a marker.
    work = tmp_path / "project" / "src"
    work.mkdir(parents=True)
    (tmp_path / "project" / MARKER).write_text("{}")
    monkeypatch.chdir(work)
    with pytest.raises(ScoringError, match="is the working directory"):
        check_destination(locate("."), overwrite=True)
    with pytest.raises(ScoringError, match="holds the working directory"):
        check_destination(locate(tmp_path / "project"), overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScoringError, match="is the home directory"):
        check_destination(locate(tmp_path / "project"), overwrite=True)
    assert (other / "thesis.txt").read_text() == "years of work"
