"""Training is right: the plain per-rank function, and data-parallel equivalence over Horovod."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from lepton_spark.cluster.stage import run_barrier
from lepton_spark.config import ModelConfig, TrainConfig
from lepton_spark.events import Event, Start
from lepton_spark.models import build_model
from lepton_spark.shards.local import write_local_shards
from lepton_spark.spec import CategoricalFeature, FeatureSpec
from lepton_spark.training.devices import Precision, choose_device, choose_precision
from lepton_spark.training.job import TrainSpec
from lepton_spark.training.worker import train_rank, train_worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPEC = FeatureSpec(
    numeric=["u", "v", "w"],
    categorical=[CategoricalFeature(name="k", vocabulary=["p", "q", "r", "s"])],
    label="y",
    num_classes=3,
)
MODEL = ModelConfig(hidden=[16, 8], embedding_dim=4)


def flat_table(rng: np.random.Generator, rows: int) -> pa.Table:
    u, v, w = rng.normal(size=(3, rows)).astype(np.float32)
    k = rng.integers(0, 5, size=rows)
    y = ((u + v * w > 0).astype(int) + (k > 2)).astype(np.int64)
    return pa.table({"u": u, "v": v, "w": w, "k": k, "y": y})


def make_shards(folder, train_tables, val_tables):
    write_local_shards(folder, {"train": train_tables, "validation": val_tables}, SPEC)
    return folder


def reference_sgd(tables: list[pa.Table], batch: int, steps: int, lr: float) -> dict:
    """One process, no Horovod: step i sees rows [i*batch, (i+1)*batch) of every table at once."""
    model = build_model(MODEL, SPEC, seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cols = [
        (
            torch.from_numpy(np.stack([t[c].to_numpy() for c in SPEC.numeric], axis=1)),
            torch.from_numpy(t["k"].to_numpy().reshape(-1, 1)),
            torch.from_numpy(t["y"].to_numpy()),
        )
        for t in tables
    ]
    for i in range(steps):
        rows = slice(i * batch, (i + 1) * batch)
        numeric = torch.cat([c[0][rows] for c in cols])
        categorical = torch.cat([c[1][rows] for c in cols])
        label = torch.cat([c[2][rows] for c in cols])
        opt.zero_grad()
        F.cross_entropy(model({"numeric": numeric, "categorical": categorical}), label).backward()
        opt.step()
    return model.state_dict()


def sgd_config(**kw) -> TrainConfig:
    return TrainConfig(
        optimizer="sgd",
        lr=0.05,
        batch_size=32,
        epochs=1,
        shuffle=False,
        seed=11,
        threads_per_rank=1,
        **kw,
    )


def test_train_worker_is_a_plain_function_that_matches_plain_torch(tmp_path, horovod):
    """One rank, no Spark: the same parameters as a hand-written SGD loop."""
    rng = np.random.default_rng(0)
    train = flat_table(rng, 32 * 5)
    folder = make_shards(tmp_path / "shards", [train], [flat_table(rng, 50)])
    cfg = sgd_config()
    result = train_worker(TrainSpec(str(folder), cfg, MODEL))
    assert (result.rank, result.size, result.steps_per_epoch) == (0, 1, 5)
    expected = reference_sgd([train], batch=32, steps=5, lr=cfg.lr)
    got = result.load_state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0)
    assert 0.0 <= result.history[0]["val/accuracy"] <= 1.0


def test_two_horovod_ranks_equal_one_process_on_the_global_batch(spark, tmp_path, horovod):
    """2 ranks × batch b with lr scaled ×2 == 1 process × batch 2b, after k SGD steps."""
    rng = np.random.default_rng(1)
    k, b = 6, 32
    halves = [flat_table(rng, k * b), flat_table(rng, k * b)]  # shard 0 → rank 0, 1 → rank 1
    folder = make_shards(tmp_path / "shards", halves, [flat_table(rng, 40), flat_table(rng, 40)])
    cfg = sgd_config()
    results = run_barrier(
        spark, functools.partial(train_rank, TrainSpec(str(folder), cfg, MODEL)), 2
    )
    assert [r.rank for r in results] == [0, 1]
    assert results[0].steps_per_epoch == k
    assert results[1].state_dict is None  # only rank 0 carries the weights back

    expected = reference_sgd(halves, batch=b, steps=k, lr=2 * cfg.lr)  # linear scaling
    got = results[0].load_state_dict()
    untrained = build_model(MODEL, SPEC, seed=11).state_dict()
    for name, value in expected.items():
        assert not torch.allclose(value, untrained[name]), f"{name} did not train"
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)
    # Metrics are averaged across ranks: both ranks report the same numbers.
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert results[0].history[0][key] == pytest.approx(results[1].history[0][key], abs=1e-9)


def test_unequal_shards_give_every_rank_the_same_number_of_steps(spark, tmp_path, horovod):
    """3 shards over 2 ranks (rank 0 gets twice the rows): no hang, equal steps."""
    rng = np.random.default_rng(2)
    tables = [flat_table(rng, 100), flat_table(rng, 100), flat_table(rng, 100)]
    folder = make_shards(tmp_path / "shards", tables, [flat_table(rng, 30)])
    cfg = sgd_config(lr_scaling="none")
    results = run_barrier(
        spark, functools.partial(train_rank, TrainSpec(str(folder), cfg, MODEL)), 2
    )
    assert [r.steps_per_epoch for r in results] == [100 // 32, 100 // 32]


def test_device_and_precision_decisions():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_device("cpu", local_rank=0) == cpu
    if not torch.cuda.is_available():
        assert choose_device("auto", local_rank=1) == cpu
        with pytest.raises(RuntimeError, match="no CUDA device"):
            choose_device("cuda", local_rank=0)
    assert choose_precision(False, gpu, bf16_supported=True) == Precision()
    assert choose_precision(True, gpu, bf16_supported=True) == Precision(torch.bfloat16)
    assert choose_precision(True, gpu, bf16_supported=False) == Precision(torch.float16, True)
    assert choose_precision(True, cpu).name == "bfloat16"
    assert choose_precision(True, gpu, bf16_supported=False).name == "float16+scaler"


def test_bf16_autocast_on_cpu_trains_to_the_same_accuracy(tmp_path, horovod):
    rng = np.random.default_rng(3)
    folder = make_shards(tmp_path / "shards", [flat_table(rng, 4096)], [flat_table(rng, 1024)])
    base = {"optimizer": "adamw", "lr": 0.01, "batch_size": 64, "epochs": 3, "seed": 5}
    events: list[Event] = []
    fp32 = train_worker(TrainSpec(str(folder), TrainConfig(**base), MODEL))
    bf16 = train_worker(
        TrainSpec(str(folder), TrainConfig(**base, mixed_precision=True), MODEL), events.append
    )
    assert [e.precision for e in events if isinstance(e, Start)] == ["bfloat16"]
    # Autocast really ran: the weights differ; and it learned as well as fp32 did.
    a, b = fp32.load_state_dict(), bf16.load_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert bf16.history[-1]["val/accuracy"] > 0.8
    assert bf16.history[-1]["val/accuracy"] == pytest.approx(
        fp32.history[-1]["val/accuracy"], abs=0.03
    )


@pytest.mark.slow  # runs the build script's probes (about 15 s)
def test_the_horovod_build_script_picks_the_flavour_this_machine_can_build(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "install_horovod.sh"
    env = {**os.environ, "PYTHON": sys.executable}

    def flavour(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(script), "--print-flavour"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    expected = "cuda" if torch.version.cuda and shutil.which("nvcc") else "cpu"
    assert flavour().stdout.strip() == expected
    # An nvcc alone does not make a CUDA build: torch must be a CUDA build too.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    (fake / "nvcc").chmod(0o755)
    with_nvcc = flavour(PATH=f"{fake}:{env['PATH']}").stdout.strip()
    assert with_nvcc == ("cuda" if torch.version.cuda else "cpu")
    assert flavour(LEPTON_HOROVOD_FLAVOUR="cuda").stdout.strip() == "cuda"
    bad = flavour(LEPTON_HOROVOD_FLAVOUR="tpu")
    assert bad.returncode == 2 and "must be cpu or cuda" in bad.stderr
