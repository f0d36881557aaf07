"""The demo pipeline on an object store: shards, checkpoints and MLflow's artifacts on a real S3
API on 127.0.0.1, and a rank killed mid-epoch resuming from the checkpoint on S3."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from pyarrow import fs as pafs

from lepton_spark import events, run_pipeline
from lepton_spark.data.sources import raw_example
from lepton_spark.names import TAG_MODEL_URI

pytestmark = pytest.mark.slow


def _keys(s3, prefix: str) -> list[str]:
    filesystem, path = pafs.FileSystem.from_uri(s3.uri(prefix))
    found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [i.path.removeprefix(f"{s3.bucket}/") for i in found if i.type == pafs.FileType.File]


def test_the_demo_on_s3_survives_a_killed_rank_and_its_model_loads_from_s3(
    spark, demo_config, horovod, s3, mlflow_server_s3
):
    cfg = demo_config.with_overrides(
        {
            "shards.root": s3.uri("shards"),
            "train.checkpoint_root": s3.uri("checkpoints"),
            "train.checkpoint_every_steps": 20,
            "train.fault_inject": "kill:1:50",
            "tracking.tracking_uri": mlflow_server_s3,
        }
    )
    seen: list[events.Event] = []
    result = run_pipeline(cfg, spark=spark, progress=seen.append)

    starts = [e for e in seen if isinstance(e, events.Start)]
    assert [e.attempt for e in starts] == [0, 1]
    assert starts[1].resumed_from == (0, 40)  # read back from the checkpoint on S3
    client = MlflowClient(mlflow_server_s3)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.metrics["val/accuracy"] > 0.8

    shards = _keys(s3, "shards")
    assert any(k.endswith("/manifest.json") for k in shards)
    assert sum(k.endswith(".arrow") for k in shards) >= 2
    # The checkpoint it resumed from went into the run (on S3 too); its folder is gone.
    assert _keys(s3, f"checkpoints/{result.run_id}") == []
    stored = _keys(s3, "mlflow")
    assert any("/checkpoint/" in k for k in stored)
    assert any(k.endswith("weights/network.safetensors") for k in stored)

    # The same folder is found again by fingerprint on the next run: no shards written twice.
    again = run_pipeline(
        demo_config.with_overrides(
            {"shards.root": s3.uri("shards"), "tracking.tracking_uri": mlflow_server_s3}
        ),
        spark=spark,
        progress=lambda e: None,
    )
    assert client.get_run(again.run_id).data.tags["shards.reused"] == "true"

    mlflow.set_tracking_uri(mlflow_server_s3)
    model = mlflow.pyfunc.load_model(run.data.tags[TAG_MODEL_URI])
    example = raw_example(spark, cfg)
    assert len(model.predict(example)) == len(example)
