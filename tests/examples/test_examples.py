"""examples/: the distributed matmul and BlockMatrix equal numpy's product, the hand-written
DDP loop learns its generated data, logs each epoch and resumes from its checkpoint, and a
TorchDistributor (or horovod.spark.run) function with its init call removed gives the same
accuracy under distributed.run."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from examples import ddp_loop, matmul, torchdistributor_port
from lepton_spark import distributed
from lepton_spark.shards import materialize


def test_row_blocks_cover_every_row_once_and_differ_by_one_at_most():
    # (fewer rows than ranks included: a rank may have none)
    for rows in (0, 1, 2, 7, 300, 301):
        for size in (1, 2, 3, 4):
            blocks = [matmul.row_block(rows, r, size) for r in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == rows
            assert all(blocks[r][1] == blocks[r + 1][0] for r in range(size - 1))
            lengths = [stop - start for start, stop in blocks]
            assert max(lengths) - min(lengths) <= 1
            assert lengths == [len(part) for part in np.array_split(np.arange(rows), size)]


@pytest.mark.parametrize(
    ("n", "k", "m", "dtype", "atol"),
    [
        # float64: both sides are double-precision BLAS; 1e-10 is ~1e4 roundings of these sums
        (300, 200, 170, "float64", 1e-10),
        # rows not divisible by 2 (151 and 150), float32: 1e-3 against sums of size ~15
        (301, 200, 170, "float32", 1e-3),
    ],
)
def test_the_distributed_multiply_equals_numpy(spark, n, k, m, dtype, atol):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal((k, m)).astype(dtype)
    c = matmul.multiply(spark, a, b, num_workers=2)
    assert c.shape == (n, m) and c.dtype == np.dtype(dtype)
    assert np.allclose(c, a @ b, rtol=0, atol=atol)
    assert atol >= matmul.tolerance(dtype, k)  # main()'s check is no looser than these


def test_blockmatrix_equals_numpy(spark):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 200)), rng.standard_normal((200, 170))
    # 64-row blocks: 5 x 4 blocks of A and 4 x 3 of B, the edge ones smaller
    c = matmul.blockmatrix_multiply(spark, a, b, block=64)
    assert np.allclose(c, a @ b, rtol=0, atol=1e-10)


def test_shapes_that_do_not_multiply_are_refused_before_any_stage(spark):
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 4\)"):
        matmul.multiply(spark, np.zeros((3, 4)), np.zeros((3, 4)))


def test_the_ddp_loop_learns_logs_each_epoch_and_resumes_from_its_checkpoint(spark, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    shards = materialize(
        ddp_loop.make_frame(spark, rows=20_000),
        label="label",
        numeric=ddp_loop.FEATURES,
        root=str(tmp_path / "shards"),
        num_workers=2,
    )
    checkpoints = tmp_path / "checkpoints"

    result = distributed_run(spark, shards, epochs=2, checkpoint_dir=checkpoints)
    assert result["started_at"] == 0 and result["trained"] == [0, 1] and result["ranks"] == 2
    assert result["accuracy"] >= 0.9
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("lepton-spark-run").experiment_id])
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(result["accuracy"])

    # The same checkpoint folder again: epochs 0 and 1 are not trained again.
    again = distributed_run(spark, shards, epochs=3, checkpoint_dir=checkpoints)
    assert again["started_at"] == 2 and again["trained"] == [2]
    assert again["accuracy"] >= 0.9


def distributed_run(spark, shards, epochs: int, checkpoint_dir) -> dict:
    return distributed.run(
        ddp_loop.train,
        shards,
        epochs,
        0.1,
        spark=spark,
        num_workers=2,
        checkpoint_dir=checkpoint_dir,
    )


# The same data, seed and ranks: the launchers give the same accuracy (measured: equal to the
# last digit; 0.005 is 5 of the 1000 validation rows, room for a float summed in another order).
SAME = 0.005


@pytest.mark.slow
def test_a_torchdistributor_function_runs_with_its_init_process_group_removed(spark, tmp_path):
    from pyspark.ml.torch.distributor import TorchDistributor

    folder = torchdistributor_port.write_parquet(spark, tmp_path / "parquet", rows=4000)
    theirs = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
        torchdistributor_port.train_for_torchdistributor, folder, 3, 0.1
    )
    ours = distributed.run(
        torchdistributor_port.train_for_lepton,
        folder,
        3,
        0.1,
        spark=spark,
        num_workers=2,
        backend="ddp",
    )
    assert theirs > 0.9 and ours > 0.9
    assert ours == pytest.approx(theirs, abs=SAME)


@pytest.mark.slow
def test_a_horovod_spark_function_runs_with_its_hvd_init_removed(spark, horovod, tmp_path):
    from horovod.spark import run as horovod_spark_run

    folder = torchdistributor_port.write_parquet(spark, tmp_path / "parquet", rows=4000)
    theirs = horovod_spark_run(
        torchdistributor_port.train_for_horovod_spark, args=(folder, 3, 0.1), num_proc=2, verbose=0
    )
    ours = distributed.run(
        torchdistributor_port.train_for_lepton_horovod,
        folder,
        3,
        0.1,
        spark=spark,
        num_workers=2,
        backend="horovod",
        return_all=True,
    )
    assert len(theirs) == len(ours) == 2  # every rank's value, in rank order, from both
    assert min(theirs) > 0.9 and min(ours) > 0.9
    assert ours == pytest.approx(theirs, abs=SAME)
