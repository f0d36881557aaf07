"""The torch-native engines end to end: the demo pipeline with ``ddp`` and ``fsdp``, a killed
rank resumed from the checkpoint, and the checkpoint of one engine run at another world size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from lepton_spark import events, run_pipeline
from lepton_spark.pipeline.steps import train_with_retries
from lepton_spark.shards.storage import locate
from lepton_spark.training.checkpoint import load_checkpoint
from lepton_spark.training.job import TrainSpec
from tests.training.test_training import MODEL, flat_table, make_shards, sgd_config


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_the_demo_trains_with_the_engine_and_resumes_a_killed_rank(
    spark, demo_config, tmp_path, backend
):
    base = {
        "train.backend": backend,
        "train.checkpoint_every_steps": 20,
        "train.checkpoint_root": str(tmp_path / "checkpoints"),
    }
    clean = run_pipeline(demo_config.with_overrides(base), spark=spark, progress=lambda e: None)
    assert clean.metrics["val/accuracy"] > 0.8  # the demo's rule is learnable in 2 epochs
    run = MlflowClient(clean.tracking_uri).get_run(clean.run_id)
    assert run.data.params["train.backend"] == backend
    # The run keeps the last checkpoint whole: FSDP's record and the sharded folder it names.
    client = MlflowClient(clean.tracking_uri)
    kept = [a.path for a in client.list_artifacts(clean.run_id, "checkpoint")]
    assert "checkpoint/checkpoint.pt" in kept
    if backend == "fsdp":
        [sharded] = [p for p in kept if p.startswith("checkpoint/sharded-")]
        parts = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(clean.run_id, sharded)}
        assert parts == {".metadata", "__0_0.distcp", "__1_0.distcp"}

    seen: list[events.Event] = []
    faulty = demo_config.with_overrides({**base, "train.fault_inject": "kill:1:50"})
    result = run_pipeline(faulty, spark=spark, progress=seen.append)
    starts = [e for e in seen if isinstance(e, events.Start)]
    assert [e.attempt for e in starts] == [0, 1]
    assert starts[1].resumed_from == (0, 40)
    # From the checkpoint at step 40 on, the same batches: the same model as without the fault.
    assert result.metrics["val/accuracy"] == pytest.approx(clean.metrics["val/accuracy"], abs=0.005)
    assert result.metrics["val/loss"] == pytest.approx(clean.metrics["val/loss"], abs=0.005)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_fsdp_checkpoint_written_by_two_ranks_resumes_on_one(spark, tmp_path, where, request):
    """The checkpoint is sharded (torch.distributed.checkpoint): each of 2 FSDP ranks writes its
    part, 1 rank carries on from it (the learning rate halved with the ranks), and its loss goes
    on falling."""
    rng = np.random.default_rng(8)
    tables = [flat_table(rng, 2048), flat_table(rng, 2048)]
    folder = make_shards(tmp_path / "shards", tables, [flat_table(rng, 500), flat_table(rng, 500)])
    # On an object store each rank stages its part locally and copies it up.
    checkpoints = (
        request.getfixturevalue("s3").uri("checkpoint")
        if where == "s3"
        else (str(tmp_path / "checkpoint"))
    )
    common = {"backend": "fsdp", "optimizer": "adamw", "lr": 0.01, "batch_size": 64}
    two = TrainSpec(str(folder), sgd_config(epochs=2, **common), MODEL, checkpoint_dir=checkpoints)
    first, _ = train_with_retries(spark, two, lambda e: None)
    saved = load_checkpoint(checkpoints)
    assert saved is not None and saved.size == 2 and saved.position.epoch == 2
    assert saved.model == {} and saved.sharded is not None  # no rank gathered the state
    # Only the latest sharded folder is left (one per epoch was written); a part per rank.
    place = locate(checkpoints)
    assert place.subfolders() == [saved.sharded]
    folder = place.child(saved.sharded)
    found = place.fs.get_file_info(pafs.FileSelector(folder.path))
    assert sorted(i.base_name for i in found) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    one = dataclasses.replace(
        two, train=sgd_config(epochs=4, num_workers=1, **common), checkpoint_dir=checkpoints
    )
    seen: list[events.Event] = []
    results, attempts = train_with_retries(spark, one, seen.append)
    [start] = [e for e in seen if isinstance(e, events.Start)]
    assert attempts == 1 and start.size == 1 and start.resumed_from == (2, 0)
    history = results[0].history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first[0].history  # the two ranks' epochs, carried over
    # On from where they were: a model that loaded nothing would start again at epoch 1's loss.
    assert history[2]["train/loss"] < history[0]["train/loss"]
    assert history[3]["train/loss"] < history[1]["train/loss"]
    assert results[0].steps_per_epoch == 2 * first[0].steps_per_epoch  # one rank: all the rows
