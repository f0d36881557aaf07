"""Shard folders do not pile up: the newest committed ones are kept, work in progress is not
touched, and ``lepton-spark shards gc`` says what it removed."""

from __future__ import annotations

import time

import pyarrow as pa

from lepton_spark.shards import gc
from lepton_spark.shards.local import write_local_shards
from lepton_spark.spec import FeatureSpec

SPEC = FeatureSpec(numeric=["x"], categorical=[], label="y", num_classes=2)


def commit(root, name: str) -> None:
    table = pa.table({"x": [0.1, 0.2], "y": [0, 1]})
    write_local_shards(root / name, {"train": [table], "validation": [table]}, SPEC)
    time.sleep(1.1)  # manifests record their time to the second


def test_the_oldest_committed_folders_beyond_keep_go_per_pipeline(tmp_path):
    folders = [f"demo-{i:016x}-w2" for i in range(4)]
    for folder in folders:
        commit(tmp_path, folder)
    commit(tmp_path, f"other-{0:016x}-w2")
    (tmp_path / f"demo-{9:016x}-w2" / "attempt-x").mkdir(parents=True)  # being written
    removed = gc.collect(tmp_path, "demo", keep=2, protect=(folders[0],))
    assert sorted(r.rsplit("/", 1)[-1] for r in removed) == [folders[1]]  # [0] is protected
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [folders[0], folders[2], folders[3], f"demo-{9:016x}-w2", f"other-{0:016x}-w2"]
    )
    assert [f.folder for f in gc.committed(tmp_path, "demo")] == [
        folders[3],
        folders[2],
        folders[0],
    ]


def test_a_folder_reused_lately_outlives_newer_ones(tmp_path):
    old, new = f"demo-{1:016x}-w2", f"demo-{2:016x}-w2"
    commit(tmp_path, old)
    commit(tmp_path, new)
    gc.touch(tmp_path / old)  # a run reused the older one after the newer was written
    removed = gc.collect(tmp_path, "demo", keep=1)
    assert [r.rsplit("/", 1)[-1] for r in removed] == [new]
    assert (tmp_path / old / gc.LAST_USED).is_file()


def test_keep_below_one_is_refused_by_name(tmp_path, cli):
    commit(tmp_path, f"demo-{1:016x}-w2")
    proc = cli("shards", "gc", "--root", str(tmp_path), "--keep", "0", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "keep must be at least 1" in proc.stderr
    assert (tmp_path / f"demo-{1:016x}-w2").is_dir()


def test_the_cli_collects_every_pipeline_under_a_root(tmp_path, cli):
    for i in range(3):
        commit(tmp_path, f"a-b-{i:016x}-w1")  # a name with a dash in it
    proc = cli("shards", "gc", "--root", str(tmp_path), "--keep", "1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 shard folder(s)" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == [f"a-b-{2:016x}-w1"]
