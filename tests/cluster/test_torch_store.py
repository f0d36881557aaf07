"""torch.distributed's store in a barrier stage: rank 0's task serves it bound to one address,
answers only signed, fresh requests from the stage's addresses, and closes its port once every
rank's process group is up; real ranks (two processes, gloo, DDP's engine) connect through it."""

from __future__ import annotations

import datetime
import http.client
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

from lepton_spark import storewire
from lepton_spark.cluster.topology import slot_plan
from lepton_spark.cluster.torchdist import StoreService, torch_env
from lepton_spark.training.store import GuardedStore, StoreError

SECRET = "stage-secret-456"

INIT = (
    "import torch\n"
    "from lepton_spark.config import TrainConfig\n"
    "from lepton_spark.training.engines import start_engine\n"
    "engine = start_engine(TrainConfig(backend='ddp', device='cpu'))\n"
    "total = engine.allreduce(torch.tensor([float(engine.rank() + 1)]))\n"
    "print('rank', engine.rank(), 'of', engine.size(), 'sum', int(total[0]))\n"
    "engine.shutdown()\n"
)


def post(address: tuple[str, int], op: str, key: str, body: bytes, secret: str, nonce: str):
    """One request as a rank sends it, signed with ``secret``: (status, body)."""
    conn = http.client.HTTPConnection(*address, timeout=5)
    headers = {
        storewire.KEY_HEADER: key,
        storewire.NONCE_HEADER: nonce,
        storewire.TIMEOUT_HEADER: "0",
        storewire.SIG_HEADER: storewire.signature(secret, op, key, nonce, 0, body),
    }
    try:
        conn.request("POST", f"/{op}", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_the_store_refuses_unsigned_replayed_and_foreign_requests():
    service = StoreService("127.0.0.1", slot_plan(["127.0.0.1"] * 2), SECRET)
    try:
        address = service.address
        nonce = "a" * 32
        assert post(address, "set", "k", b"v", SECRET, nonce) == (200, b"")
        assert post(address, "set", "k", b"forged", SECRET, nonce)[0] == 403  # replayed
        assert post(address, "set", "k", b"forged", "not-the-secret", "b" * 32)[0] == 403
        assert post(address, "get", "k", b"", SECRET, "c" * 32) == (200, b"v")  # not changed
        assert post(address, "shell", "k", b"", SECRET, "d" * 32)[0] == 403  # no such op
        conn = http.client.HTTPConnection(*address, timeout=5)
        conn.request("GET", "/get")
        assert conn.getresponse().status == 403
        conn.close()
        assert service.refused == 4
    finally:
        service.stop()

    # A valid request from an address that holds no slot of the stage.
    elsewhere = StoreService("127.0.0.1", slot_plan(["127.0.0.2"]), SECRET)
    try:
        assert post(elsewhere.address, "get", "k", b"", SECRET, "e" * 32)[0] == 403
        assert elsewhere.refused == 1
    finally:
        elsewhere.stop()


def test_the_guarded_store_keeps_torchs_store_semantics():
    service = StoreService("127.0.0.1", slot_plan(["127.0.0.1"]), SECRET)
    try:
        where = "{}:{}".format(*service.address)
        store = GuardedStore(where, SECRET, datetime.timedelta(seconds=60))
        started = time.monotonic()  # before the timer starts: it sets the key 0.3 s after
        threading.Timer(0.3, lambda: store.set("late", b"\x00\xffbytes")).start()
        assert store.get("late") == b"\x00\xffbytes"  # waited for it
        assert time.monotonic() - started >= 0.2
        assert store.add("n", 2) == 2 and store.add("n", 3) == 5
        assert store.compare_set("c", b"", b"first") == b"first"
        assert store.compare_set("c", b"wrong", b"second") == b"first"
        assert store.compare_set("c", b"first", b"second") == b"second"
        assert store.check(["late", "n"]) and not store.check(["late", "missing"])
        assert store.delete_key("n") and not store.delete_key("n")
        assert store.num_keys() == 2
        # What torch itself calls: through a PrefixStore (init_process_group's), by C++ names.
        prefixed = dist.PrefixStore("group", store)  # keys "group/..."
        prefixed.set("k", b"v")
        assert prefixed.get("k") == b"v" and store.get("group/k") == b"v"
        assert prefixed.num_keys() == 3 and prefixed.delete_key("k")
        with pytest.raises(dist.DistStoreError, match="timed out"):
            store.wait(["never"], datetime.timedelta(milliseconds=300))
        wrong = GuardedStore(where, "not-the-secret", store.timeout)
        with pytest.raises(StoreError, match="refused"):
            wrong.get("late")
    finally:
        service.stop()


def test_two_ddp_ranks_meet_through_it_and_its_port_closes():
    slots = slot_plan(["127.0.0.1", "127.0.0.1"])
    service = StoreService("127.0.0.1", slots, SECRET)
    host, port = service.address
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", INIT],
                env={**os.environ, **torch_env(slot, (host, port), "lo", SECRET)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for slot in slots
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert sorted(out.strip() for out, _ in outputs) == [
            "rank 0 of 2 sum 3",
            "rank 1 of 2 sum 3",
        ]
        assert service.refused == 0
        # Closed before the last rank heard back from its ready call: not a moment later.
        assert service.closed
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=2).close()
    finally:
        service.stop()
