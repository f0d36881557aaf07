"""What lepton-spark asks of a session, answered without one where the answer is in a string."""

from __future__ import annotations

from lepton_spark.sparkinfo import client_address, local_cores


def test_local_masters_say_their_cores():
    assert local_cores("local") == 1
    assert local_cores("local[4]") == 4
    assert local_cores("local[3, 2]") == 3  # with retries
    assert local_cores("local[*]") is None
    assert local_cores("local-cluster[2, 3, 1024]") == 6  # workers x cores
    assert local_cores("local[2,x]") is None
    assert local_cores("spark://m:7077") is None


def test_a_loopback_server_is_reached_from_loopback():
    assert client_address("sc://127.0.0.1:15002") == "127.0.0.1"
    assert client_address("sc://localhost:15002") == "127.0.0.1"
    assert client_address("sc://no-such-host.invalid:1") == "127.0.0.1"
