"""The rank loop's steps, called one by one on each real engine as one process (no Spark)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_spark import events
from lepton_spark.config import ModelConfig, TrainConfig
from lepton_spark.names import TRAIN_LOSS, VAL_ACCURACY
from lepton_spark.shards.local import write_local_shards
from lepton_spark.training import loop
from lepton_spark.training.checkpoint import Position, load_checkpoint
from lepton_spark.training.engines import HorovodEngine, start_engine
from lepton_spark.training.heartbeat import no_beat
from lepton_spark.training.job import TrainSpec
from tests.training.test_training import SPEC, flat_table


@pytest.mark.parametrize("backend", ["horovod", "ddp", "fsdp"])
def test_each_step_of_an_epoch_and_a_resume_from_its_checkpoint(tmp_path, request, backend):
    rng = np.random.default_rng(4)
    folder = tmp_path / "shards"
    write_local_shards(
        folder, {"train": [flat_table(rng, 640)], "validation": [flat_table(rng, 200)]}, SPEC
    )
    cfg = TrainConfig(batch_size=64, epochs=2, lr=0.01, seed=3, threads_per_rank=1, backend=backend)
    spec = TrainSpec(str(folder), cfg, ModelConfig(hidden=[8]), checkpoint_dir=str(tmp_path / "ck"))
    reported: list[events.Event] = []
    beats: list[tuple] = []
    if backend == "horovod":
        hvd = request.getfixturevalue("horovod")
        hvd.init()
        engine = HorovodEngine(hvd)
    else:
        engine = start_engine(cfg)
    try:
        data = loop.open_data(spec, rank=0, size=1, local_rank=0, beat=no_beat)
        assert data.steps == 10 and data.train.rows == 640 and data.validation.rows == 200
        trainer = loop.set_up(spec, engine, data)
        start = loop.resume(spec, engine, trainer)
        assert start.position == Position() and start.checkpoint_at is None
        loop.announce(reported.append, spec, 1, data, trainer, start)
        run = loop.train_epoch(
            spec,
            0,
            1,
            data,
            trainer,
            start.position,
            [],
            reported.append,
            lambda *at: beats.append(at),
        )
        assert (run.steps_done, run.global_step) == (10, 10)
        assert [b[:2] for b in beats] == [(0, step) for step in range(1, 11)]
        sums = loop.evaluate(trainer.model, data.validation, data.device, trainer.objective)
        metrics, confusion = loop.reduce_epoch(engine, trainer, run, sums, cfg.batch_size)
        assert 0.0 <= metrics[VAL_ACCURACY] <= 1.0 and metrics[TRAIN_LOSS] > 0
        assert confusion is not None and sum(map(sum, confusion)) == 200
        history = [{"epoch": 1, **metrics}]
        loop.checkpoint(spec, 0, trainer, history, Position(1, 0, run.global_step))
        saved = {k: v.clone() for k, v in engine.model_state(trainer.model).items()}
        second = loop.train_epoch(
            spec, 0, 1, data, trainer, Position(1, 0, 10), history, None, no_beat
        )
        assert (second.steps_done, second.global_step) == (10, 20)  # the count goes on

        again = loop.set_up(spec, engine, data)
        resumed = loop.resume(spec, engine, again)
        restored = engine.model_state(again.model)
    finally:
        engine.shutdown()
    assert [type(e) for e in reported] == [events.Start, events.Progress]  # step 10 = the last
    assert resumed.position == Position(1, 0, 10) and resumed.history == history
    assert load_checkpoint(tmp_path / "ck").position == Position(1, 0, 10)
    for name, value in saved.items():
        torch.testing.assert_close(restored[name], value)
    assert set(restored) == set(saved) and not any(k.startswith("module.") for k in saved)
