"""The stage's Horovod rendezvous server answers only requests that carry the stage's secret from
the stage's addresses, and closes its port once every rank said it is initialised; real Horovod
ranks (two processes, Gloo) initialise through it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from lepton_spark.cluster.horovod import RendezvousService, horovod_env, rendezvous_address
from lepton_spark.cluster.topology import slot_plan

INIT = (
    "import horovod.torch as hvd\n"
    "from lepton_spark.training.worker import tell_rendezvous_ready\n"
    "hvd.init(); tell_rendezvous_ready(hvd.rank()); print('rank', hvd.rank(), 'of', hvd.size())\n"
    "hvd.shutdown()\n"
)


def status(url: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, data=b"x" if method == "PUT" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_requests_without_the_secret_are_refused_and_the_port_closes_after_init(horovod):
    slots = slot_plan(["127.0.0.1", "127.0.0.1"])
    secret = "stage-secret-123"
    server = RendezvousService("127.0.0.1", slots, secret)
    host, port = server.address
    try:
        # What Horovod's own server answers to anyone: a stranger without the secret cannot.
        assert status(f"http://{host}:{port}/global/rank_0") == 403
        assert status(f"http://{host}:{port}/global/rank_0", "PUT") == 403
        assert status(f"http://{host}:{port}/wrong:{port}/global/rank_0") == 403
        assert status(f"http://{host}:{port}/{secret}:{port}/global/none") == 404  # admitted
        assert server.refused == 3

        procs = []
        # An HTTP proxy in the ranks' environment that goes nowhere: the ready calls (their path
        # holds the secret) must go straight to the server all the same.
        proxy = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
        proxy |= {"no_proxy": "", "NO_PROXY": ""}
        for slot in slots:
            # Gloo's timeout covers the other rank's start-up (torch's import) on a busy machine.
            env = horovod_env(slot, (rendezvous_address(host, port, secret), port), "lo", 120)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", INIT],
                    env={**os.environ, **env, **proxy},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert sorted(out.strip() for out, _ in outputs) == ["rank 0 of 2", "rank 1 of 2"]

        # Closed before the last rank heard back from its ready call: not a moment later.
        assert server.closed
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=2).close()
    finally:
        server.stop()
