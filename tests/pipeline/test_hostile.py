"""A hostile peer on the cluster's network during a real training stage: it finds the driver's
event port and sends what it can (unsigned, forged, oversized and malformed lines, a thousand idle
connections). The run finishes with the metrics of a clean run, no forged metric is in it, the
driver's memory stays bounded, what the channel refused is counted in the run, and the Horovod
rendezvous port is closed once training runs."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time

import psutil
import pytest
from mlflow import MlflowClient

from lepton_spark import events, run_pipeline
from lepton_spark.cluster.channel import MAX_CONNECTIONS
from lepton_spark.names import EVENTS_DROPPED_PREFIX, VAL_ACCURACY

pytestmark = pytest.mark.slow

FORGED = {"v": 1, "event": "epoch", "epoch": 1, "metrics": {VAL_ACCURACY: 1.0, "val/forged": 7.0}}


def attack(host: str, port: int, idle: list[socket.socket], rss: list[int]) -> None:
    """``rss``: the driver's (this process's) resident memory, sampled while the attack runs."""
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            rss.append(me.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        _attack(host, port, idle)
    finally:
        done.set()
        sampler.join()


def _attack(host: str, port: int, idle: list[socket.socket]) -> None:
    lines = [
        b"{not json\n",
        json.dumps(FORGED).encode() + b"\n",  # unsigned
        json.dumps({"sender": "x", "seq": 1, "body": json.dumps(FORGED), "sig": "00" * 32}).encode()
        + b"\n",  # a guessed signature
        json.dumps({"sender": 1, "seq": "a", "body": {}, "sig": "z"}).encode() + b"\n",  # malformed
    ]
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"".join(lines))
    with socket.create_connection((host, port), timeout=10) as raw, contextlib.suppress(OSError):
        chunk = b"x" * (1 << 20)
        for _ in range(100):  # a 100 MB line: the server hangs up after the first MB
            raw.sendall(chunk)
    for _ in range(1000):
        with contextlib.suppress(OSError):
            idle.append(socket.create_connection((host, port), timeout=10))


class _Attacker(logging.Handler):
    """Learns where the event channel listens (the stage says it), attacks once training runs."""

    def __init__(self) -> None:
        super().__init__()
        self.idle: list[socket.socket] = []
        self.rss: list[int] = []
        self.target: tuple[str, int] | None = None
        self.thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"event channel at ([\d.]+):(\d+)", record.getMessage())
        if found:
            self.target = (found[1], int(found[2]))

    def start(self) -> None:
        if self.thread is None and self.target is not None:
            self.thread = threading.Thread(target=attack, args=(*self.target, self.idle, self.rss))
            self.thread.start()


def test_a_hostile_peer_on_the_event_port_changes_nothing_in_the_run(
    spark, demo_config, tmp_path, horovod
):
    clean = run_pipeline(demo_config, spark=spark, progress=lambda e: None)
    attacker = _Attacker()
    logger = logging.getLogger("lepton_spark.cluster.stage")
    logger.addHandler(attacker)
    previous = logger.level
    logger.setLevel(logging.INFO)
    rendezvous: list[tuple[str, int]] = []
    open_while_training: list[bool] = []

    def progress(event: events.Event) -> None:
        if isinstance(event, events.Rendezvous):
            rendezvous.append((event.host, event.port))
        elif isinstance(event, events.Progress) and rendezvous and not open_while_training:
            # Training runs: every rank has initialised, so the rendezvous port is closed.
            try:
                socket.create_connection(rendezvous[0], timeout=2).close()
                open_while_training.append(True)
            except OSError:
                open_while_training.append(False)
            attacker.start()

    try:
        result = run_pipeline(demo_config, spark=spark, progress=progress)
    finally:
        logger.removeHandler(attacker)
        logger.setLevel(previous)
        if attacker.thread is not None:
            attacker.thread.join(timeout=60)
        for sock in attacker.idle:
            sock.close()
    assert attacker.thread is not None, "the stage never said where its event channel is"
    assert open_while_training == [False], "the rendezvous port was open during training"
    assert len(attacker.idle) > MAX_CONNECTIONS  # (the stage may end before all 1,000 are in)
    # A 100 MB line and a thousand connections: the driver's memory grows by less than 64 MiB.
    assert len(attacker.rss) > 3 and max(attacker.rss) - attacker.rss[0] < 64 << 20

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(result.run_id, VAL_ACCURACY)
    assert [m.step for m in history] == [1, 2]
    assert all(m.value < 0.99 for m in history)  # the forged 1.0 is not among them
    assert "val/forged" not in run.data.metrics
    for name in (VAL_ACCURACY, "val/loss"):  # the same seed and shards: the clean run's model
        assert result.metrics[name] == pytest.approx(clean.metrics[name], abs=1e-4)
    dropped = {
        k.removeprefix(EVENTS_DROPPED_PREFIX): v
        for k, v in run.data.metrics.items()
        if k.startswith(EVENTS_DROPPED_PREFIX)
    }
    assert dropped["not_json"] >= 1 and dropped["unsigned"] >= 2
    assert dropped["bad_signature"] >= 1 and dropped["oversized"] == 1
    assert dropped["refused"] >= 1  # over the connection limit (the rest timed out unheard)
