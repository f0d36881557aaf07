"""Training is right: the plain per-rank function, and data-parallel equivalence on each engine."""

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

from lepton_spark.cluster.stage import BarrierSettings, run_barrier
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
    settings = {
        "optimizer": "sgd",
        "lr": 0.05,
        "batch_size": 32,
        "epochs": 1,
        "shuffle": False,
        "seed": 11,
        "threads_per_rank": 1,
    }
    return TrainConfig(**{**settings, **kw})


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


@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_two_ranks_equal_one_process_on_the_global_batch(spark, tmp_path, request, backend):
    """2 ranks × batch b with lr scaled ×2 == 1 process × batch 2b, after k SGD steps."""
    if backend == "horovod":
        request.getfixturevalue("horovod")
    rng = np.random.default_rng(1)
    k, b = 6, 32
    halves = [flat_table(rng, k * b), flat_table(rng, k * b)]  # shard 0 → rank 0, 1 → rank 1
    folder = make_shards(tmp_path / "shards", halves, [flat_table(rng, 40), flat_table(rng, 40)])
    cfg = sgd_config(backend=backend)
    results = run_barrier(
        spark,
        functools.partial(train_rank, TrainSpec(str(folder), cfg, MODEL)),
        2,
        settings=BarrierSettings(engine=backend),
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


def test_fsdp_ranks_hold_half_the_model_and_train_it_as_ddp_does(spark, tmp_path):
    """The same seeded model, data and AdamW steps: 2 FSDP ranks (each holding its half of the
    parameters and optimizer state) end where 2 DDP ranks do; and the validation metrics agree,
    with one rank given fewer validation rows (FSDP's forward passes are collectives)."""
    rng = np.random.default_rng(5)
    k, b = 5, 32
    halves = [flat_table(rng, k * b), flat_table(rng, k * b)]
    folder = make_shards(tmp_path / "shards", halves, [flat_table(rng, 4100), flat_table(rng, 20)])
    model = ModelConfig(hidden=[64, 32], embedding_dim=4)
    trained = {}
    for backend in ("ddp", "fsdp"):
        cfg = sgd_config(backend=backend, optimizer="adamw", lr=0.01)
        spec = TrainSpec(str(folder), cfg, model)
        trained[backend] = run_barrier(
            spark,
            functools.partial(train_rank, spec),
            2,
            settings=BarrierSettings(engine=backend),
        )
    ddp, fsdp = (trained[b][0].load_state_dict() for b in ("ddp", "fsdp"))
    untrained = build_model(model, SPEC, seed=11).state_dict()
    assert set(ddp) == set(fsdp) == set(untrained)
    for name, value in ddp.items():
        assert not torch.allclose(value, untrained[name]), f"{name} did not train"
        torch.testing.assert_close(fsdp[name], value, atol=1e-4, rtol=0)
    for key in ("train/loss", "val/loss", "val/accuracy"):
        got = [trained[b][0].history[0][key] for b in ("ddp", "fsdp")]
        assert got[0] == pytest.approx(got[1], abs=1e-4), key


@pytest.mark.parametrize("backend", ["horovod", "ddp", "fsdp"])
def test_accumulating_four_batches_on_two_ranks_equals_one_process_on_a_4x_batch(
    spark, tmp_path, request, backend
):
    """``accumulate_steps=4``: 2 ranks × 4 batches of b per step (lr × 2 ranks × 4) == one
    process with batches of 2 × 4b; the last step of the epoch has 2 batches only."""
    if backend == "horovod":
        request.getfixturevalue("horovod")
    rng = np.random.default_rng(6)
    b, batches = 16, 10  # optimizer steps of 4, 4 and 2 batches
    halves = [flat_table(rng, batches * b), flat_table(rng, batches * b)]
    folder = make_shards(tmp_path / "shards", halves, [flat_table(rng, 40), flat_table(rng, 40)])
    cfg = sgd_config(backend=backend, batch_size=b, accumulate_steps=4)
    results = run_barrier(
        spark,
        functools.partial(train_rank, TrainSpec(str(folder), cfg, MODEL)),
        2,
        settings=BarrierSettings(engine=backend),
    )
    got = results[0].load_state_dict()
    expected = reference_steps(halves, [4 * b, 4 * b, 2 * b], lr=2 * 4 * cfg.lr)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=0)


def reference_steps(tables: list[pa.Table], batches: list[int], lr: float) -> dict:
    """One process: step i takes the next ``batches[i]`` rows of every table at once, its loss
    the mean over the step's batches of b rows each (as accumulation averages them)."""
    model = build_model(MODEL, SPEC, seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start = 0
    for rows in batches:
        parts = [t.slice(start, rows) for t in tables]
        numeric = torch.cat(
            [torch.from_numpy(np.stack([p[c].to_numpy() for c in SPEC.numeric], 1)) for p in parts]
        )
        categorical = torch.cat([torch.from_numpy(p["k"].to_numpy().reshape(-1, 1)) for p in parts])
        label = torch.cat([torch.from_numpy(p["y"].to_numpy()) for p in parts])
        opt.zero_grad()
        out = model({"numeric": numeric, "categorical": categorical})
        F.cross_entropy(out, label).backward()
        opt.step()
        start += rows
    return model.state_dict()


@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_fp16_gradients_train_as_fp32_ones_do_within_their_rounding(
    spark, tmp_path, request, backend
):
    if backend == "horovod":
        request.getfixturevalue("horovod")
    rng = np.random.default_rng(7)
    k, b = 6, 32
    halves = [flat_table(rng, k * b), flat_table(rng, k * b)]
    folder = make_shards(tmp_path / "shards", halves, [flat_table(rng, 40), flat_table(rng, 40)])
    cfg = sgd_config(backend=backend, compression="fp16")
    results = run_barrier(
        spark,
        functools.partial(train_rank, TrainSpec(str(folder), cfg, MODEL)),
        2,
        settings=BarrierSettings(engine=backend),
    )
    got = results[0].load_state_dict()
    expected = reference_sgd(halves, batch=b, steps=k, lr=2 * cfg.lr)
    diffs = [float((got[n] - v).abs().max()) for n, v in expected.items()]
    assert max(diffs) < 2e-3  # fp16 keeps 11 bits of each gradient
    assert max(diffs) > 0.0  # ... and the gradients did travel in fp16


def held_by_rank(cfg: TrainConfig, ctx) -> tuple[int, int, int]:
    """In one rank: the model's parameters, those this rank holds, its optimizer state's."""
    from lepton_spark.training.engines import start_engine
    from lepton_spark.training.optim import make_optimizer

    engine = start_engine(cfg)
    try:
        model = build_model(ModelConfig(hidden=[256, 256]), SPEC, seed=0)
        total = sum(p.numel() for p in model.parameters())
        model, optimizer = engine.wrap(model, lambda ps: make_optimizer(cfg, ps, 0.01), cpu)
        local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters()]
        for p, here in zip(model.parameters(), local, strict=True):
            p.grad = torch.ones_like(p)  # a step makes AdamW's state
            assert here.numel() <= p.numel()
        optimizer.step()
        state = sum(
            getattr(v, "to_local", lambda v=v: v)().numel()
            for s in optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        return total, sum(t.numel() for t in local), state
    finally:
        engine.shutdown()


cpu = torch.device("cpu")


def test_each_fsdp_rank_holds_about_half_the_parameters_and_optimizer_state(spark):
    cfg = sgd_config(backend="fsdp", optimizer="adamw")
    results = run_barrier(
        spark, functools.partial(held_by_rank, cfg), 2, settings=BarrierSettings(engine="fsdp")
    )
    (total, held0, state0), (_, held1, state1) = results
    assert held0 + held1 == total  # every parameter on exactly one rank
    assert max(held0, held1) <= 0.55 * total
    assert state0 + state1 == 2 * total  # AdamW's two moments, sharded the same way
    assert max(state0, state1) <= 0.55 * 2 * total


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
