"""Rank → driver messages: typed and versioned, validated where they arrive (a real TCP channel)."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from lepton_spark import events
from lepton_spark.cluster.channel import (
    FIRST_LINE_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_LINE_BYTES,
    EventClient,
    EventServer,
    sign,
)
from tests.helpers import wait_until

PROGRESS = events.Progress(
    epoch=1, step=50, steps=100, global_step=50, loss=0.4, window_loss=0.3, samples_per_second=9e4
)


def test_every_event_round_trips_through_its_wire_form():
    samples = [
        events.Start(
            size=2, device="cpu", precision="fp32", epochs=3, steps_per_epoch=9, attempt=0
        ),
        PROGRESS,
        events.Epoch(epoch=2, metrics={"val/accuracy": 0.9, "train/loss": 0.3}),
        events.Heartbeat(rank=1, host="10.0.0.7", epoch=0, step=4, doing=events.Phase.EVALUATING),
        events.RankFailed(rank=1, error="rank 1 on h failed: boom", input_error=True),
        events.Rendezvous(host="127.0.0.1", port=4242),
        events.Retry(attempt=2, of=3),
    ]
    for event in samples:
        wire = json.dumps(events.encode(event))
        assert events.decode(wire) == event
        assert events.encode(event)["v"] == events.VERSION


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("not json", "JSON"),
        ({"event": "epoch", "epoch": 1, "metrics": {"x": "high"}}, "metrics"),  # not a number
        ({"event": "epoch", "epoch": 1}, "metrics"),  # missing
        ({"event": "epoch", "epoch": 1, "metrics": {}, "extra": 1}, "extra"),  # unknown field
        ({"v": 2, "event": "epoch", "epoch": 1, "metrics": {}}, "v"),  # another version
        ({"event": "shutdown"}, "shutdown"),  # no such event
        ({"event": "heartbeat", "rank": -1, "host": "h", "epoch": 0, "step": 0}, "rank"),
        (
            {"event": "heartbeat", "rank": 0, "host": "h", "epoch": 0, "step": 0, "doing": 9},
            "doing",
        ),
    ],
)
def test_a_message_that_does_not_match_its_schema_is_refused(data, why):
    with pytest.raises(events.InvalidEvent) as refused:
        events.decode(data if isinstance(data, str) else json.dumps(data))
    assert why in str(refused.value) or why == "JSON"


def signed_line(key: str, sender: str, seq: int, event: dict | str, sig: str | None = None):
    body = event if isinstance(event, str) else json.dumps(event)
    line = {"sender": sender, "seq": seq, "body": body}
    line["sig"] = sig if sig is not None else sign(key, sender, seq, body)
    return json.dumps(line).encode() + b"\n"


def test_the_driver_gets_only_signed_fresh_valid_events():
    received: list[events.Event] = []
    with EventServer("127.0.0.1", received.append) as server:
        host, port, key = server.address.rsplit(":", 2)
        assert key not in server.where
        client = EventClient(server.address)
        client.send(PROGRESS)
        assert wait_until(lambda: received == [PROGRESS], 10)
        forged_epoch = {"event": "epoch", "epoch": 1, "metrics": {"val/accuracy": 1.0}}
        retry = events.encode(events.Retry(attempt=2, of=3))
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"".join(
                    [
                        b"not json\n",
                        json.dumps({"token": key, **forged_epoch}).encode() + b"\n",  # unsigned
                        signed_line("0" * 64, "peer", 1, forged_epoch),  # another key
                        signed_line(key, "peer", 1, forged_epoch, sig="ab" * 32),  # forged
                        signed_line(key, "peer", 2, {"event": "nonsense"}),  # invalid
                        signed_line(key, "peer", 3, retry),  # fine
                        signed_line(key, "peer", 3, retry),  # replayed
                        signed_line(key, "peer", 1, retry),  # replayed, older
                    ]
                )
            )
        client.close()
        expected = {"not_json": 1, "unsigned": 1, "bad_signature": 2, "invalid": 1, "replayed": 2}
        assert wait_until(lambda: len(received) == 2 and server.dropped == expected, 10), (
            server.dropped
        )
    assert received == [PROGRESS, events.Retry(attempt=2, of=3)]


def test_an_oversized_line_closes_its_connection_and_idle_peers_do_not_block_ranks():
    received: list[events.Event] = []
    with EventServer("127.0.0.1", received.append) as server:
        host, port, _ = server.address.rsplit(":", 2)
        # the server hangs up mid-line: the second write may fail
        with socket.create_connection((host, int(port))) as raw, contextlib.suppress(OSError):
            raw.sendall(b"x" * (MAX_LINE_BYTES + 10))
            raw.sendall(b"x" * (8 << 20))
        assert wait_until(lambda: server.dropped.get("oversized") == 1, 10), server.dropped
        # More idle connections than the limit, left open: those over it are refused at once,
        # the others closed when they have sent nothing valid in time; then a rank gets in.
        idle = [socket.create_connection((host, int(port))) for _ in range(MAX_CONNECTIONS + 44)]
        try:
            assert wait_until(lambda: server.dropped.get("refused", 0) == 44, 10), server.dropped
            time.sleep(FIRST_LINE_TIMEOUT_S + 1)
            client = EventClient(server.address)
            client.send(PROGRESS)
            assert wait_until(lambda: received == [PROGRESS], 10), server.dropped
            client.close()
        finally:
            for sock in idle:
                sock.close()
