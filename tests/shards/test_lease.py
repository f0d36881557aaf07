"""A run's lease on a shard folder keeps another run's commit and the garbage collector from
removing what it trains on; once released, or expired (a killed run's), it blocks nothing."""

from __future__ import annotations

import json
import time

from lepton_spark.shards import gc
from lepton_spark.shards.commit import remove_older_attempts
from lepton_spark.shards.lease import LEASES, lease, live_leases
from tests.shards.test_gc import commit


def test_a_live_lease_keeps_the_older_attempts(tmp_path):
    folder = tmp_path / "demo-0123456789abcdef-w2"
    old, new = folder / "attempt-20261201T000000000000-aaaa", folder / "attempt-20261202-bbbb"
    old.mkdir(parents=True)
    new.mkdir()
    with lease(folder):
        assert live_leases(folder) == 1
        remove_older_attempts(folder, new.name)
        assert old.exists()  # a run may be training on it
    assert live_leases(folder) == 0
    assert list((folder / LEASES).iterdir()) == []
    remove_older_attempts(folder, new.name)
    assert not old.exists() and new.exists()


def test_gc_keeps_a_leased_folder_and_removes_it_once_released(tmp_path):
    folders = [f"demo-{i:016x}-w2" for i in range(2)]
    for folder in folders:
        commit(tmp_path, folder)
    with lease(tmp_path / folders[0]):
        assert gc.collect(tmp_path, "demo", keep=1) == []
    [removed] = gc.collect(tmp_path, "demo", keep=1)
    assert removed.endswith(folders[0])


def test_an_expired_lease_of_a_killed_run_blocks_nothing(tmp_path):
    folder = tmp_path / "f"
    (folder / LEASES).mkdir(parents=True)
    (folder / LEASES / "dead.json").write_text(json.dumps({"expires_at": time.time() - 1}))
    (folder / LEASES / "live.json").write_text(json.dumps({"expires_at": time.time() + 60}))
    (folder / LEASES / "torn.json").write_text("{")  # unreadable: counted as live, to be safe
    assert live_leases(folder) == 2
    (folder / LEASES / "live.json").unlink()
    (folder / LEASES / "torn.json").unlink()
    assert live_leases(folder) == 0
