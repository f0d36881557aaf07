"""Starting an engine: what a rank says when it cannot, in a fresh interpreter each time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

START = (
    "import sys\n"
    "from lepton_spark.config import TrainConfig\n"
    "from lepton_spark.errors import InputError\n"
    "from lepton_spark.training.engines import start_engine\n"
    "{before}\n"
    "try:\n"
    "    start_engine(TrainConfig(backend={backend!r})).shutdown()\n"
    "except InputError as err:\n"
    "    print(err)\n"
    "    sys.exit(2)\n"
)


def start(backend: str, before: str = "", **env: str) -> subprocess.CompletedProcess:
    code = START.format(backend=backend, before=before)
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_horovod_asked_for_on_a_machine_without_it_says_what_to_install():
    # A machine where `import horovod` fails: Python's own way to make an import fail.
    proc = start("horovod", before="sys.modules['horovod'] = None")
    assert proc.returncode == 2, proc.stderr
    assert "horovod is not installed" in proc.stdout
    assert "scripts/install_horovod.sh" in proc.stdout and "'ddp'" in proc.stdout


@pytest.mark.parametrize(
    ("backend", "env", "named"),
    [
        ("ddp", {"HOROVOD_SIZE": "2", "HOROVOD_RANK": "0"}, "set this rank up for horovod"),
        ("horovod", {"WORLD_SIZE": "2", "RANK": "0"}, "set this rank up for torch.distributed"),
    ],
)
def test_a_rank_refuses_an_engine_its_stage_did_not_set_up(backend, env, named):
    """Otherwise each rank would silently train alone."""
    proc = start(backend, **env)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stdout and "started for train.backend" in proc.stdout


def test_one_ddp_rank_without_a_stage_is_a_world_of_one():
    code = (
        "import torch\n"
        "from lepton_spark.config import TrainConfig\n"
        "from lepton_spark.training.engines import start_engine\n"
        "e = start_engine(TrainConfig(backend='ddp'))\n"
        "t = e.allreduce(torch.tensor([3.0]))\n"
        "g = e.allgather(torch.ones(2, 3))\n"
        "print(e.rank(), e.size(), float(t[0]), tuple(g.shape))\n"
        "e.shutdown()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "3.0", "(2,", "3)"]
