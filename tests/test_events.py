"""Rank → driver messages: typed and versioned, validated where they arrive (a real TCP channel)."""

from __future__ import annotations

import json
import socket

import pytest

from lepton_spark import events
from lepton_spark.cluster.channel import EventClient, EventServer
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


def test_the_driver_gets_only_valid_events_carrying_its_token():
    received: list[events.Event] = []
    with EventServer("127.0.0.1", received.append) as server:
        host, port, token = server.address.rsplit(":", 2)
        client = EventClient(server.address)
        client.send(PROGRESS)
        assert wait_until(lambda: received == [PROGRESS], 10)
        with socket.create_connection((host, int(port))) as raw:
            lines = [
                {"token": token, "event": "epoch", "epoch": 1, "metrics": {"x": "high"}},
                {"token": token, "event": "nonsense"},
                {"token": token, **events.encode(events.Retry(attempt=2, of=3))},
            ]
            raw.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        with socket.create_connection((host, int(port))) as raw:  # no token: the line is dropped
            raw.sendall(json.dumps(events.encode(events.Retry(attempt=9, of=9))).encode() + b"\n")
        client.close()
        assert wait_until(lambda: len(received) == 2 and server.dropped == 3, 10)
    assert received == [PROGRESS, events.Retry(attempt=2, of=3)]
