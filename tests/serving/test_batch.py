"""Batch scoring on Spark, classic and Connect: the same predictions as the pyfunc model, the model
loaded once per Python worker, and the output replaced only by a whole one."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from lepton_spark.config.schema import ModelConfig
from lepton_spark.models import build_model
from lepton_spark.serving.batch import score
from lepton_spark.serving.pyfunc import log_model, pip_requirements
from lepton_spark.spec import CategoricalFeature, FeatureSpec, Standardization

pytestmark = pytest.mark.connect

SPEC = FeatureSpec(
    numeric=["x", "y"],
    categorical=[CategoricalFeature(name="c", vocabulary=["p", "q", "r"])],
    label="label",
    num_classes=3,
    standardize={"x": Standardization(mean=1.0, std=2.0)},
)


@pytest.fixture()
def logged(tmp_path) -> str:
    """A lepton-spark model (untrained weights: the scoring path is what is tested) in a local
    MLflow store; its URI."""
    model = ModelConfig(hidden=[8], embedding_dim=2)
    network = build_model(model, SPEC, seed=0).eval()
    example = pd.DataFrame({"x": [0.5, 1.0], "y": [2.0, -1.0], "c": ["p", "zz"]})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("scoring", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        return log_model(network, model, SPEC, example, pip_requirements=pip_requirements())


def test_score_matches_the_pyfunc_model_and_loads_it_once_per_worker(spark, logged, tmp_path):
    rng = np.random.default_rng(1)
    rows = 5000
    frame = pd.DataFrame(
        {
            "id": np.arange(rows),
            "x": rng.normal(size=rows),
            "y": rng.normal(size=rows),
            "c": rng.choice(["p", "q", "r", "new"], rows),
        }
    )
    table = tmp_path / "input.parquet"
    spark.createDataFrame(frame).repartition(2).write.parquet(str(table))
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "500")
    try:
        result = score(spark, logged, str(table), str(tmp_path / "out"), keys=["id"])
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)
    assert result.rows == rows and result.batches >= rows // 500
    assert 1 <= result.model_loads <= 2 < result.batches

    scored = pd.read_parquet(tmp_path / "out").sort_values("id").reset_index(drop=True)
    assert list(scored.columns) == ["id", "prediction", "probabilities"]
    expected = mlflow.pyfunc.load_model(logged).predict(frame)
    assert (scored["prediction"].to_numpy() == expected["prediction"].to_numpy()).all()
    np.testing.assert_allclose(
        np.stack(scored["probabilities"]), np.stack(expected["probabilities"]), rtol=1e-5
    )

    # Again over the same output: replaced whole.
    again = score(spark, logged, str(table), str(tmp_path / "out"), keys=["id"], overwrite=True)
    assert again.rows == rows
    assert len(pd.read_parquet(tmp_path / "out")) == rows


def test_scores_on_s3_are_whole_after_each_overwrite_and_only_one_attempt_is_kept(
    spark, logged, tmp_path, s3
):
    """``score --output s3://…`` on an S3 API (no folder renames): written by the executors under
    an attempt prefix, committed by the marker, the old attempt deleted only after."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    from lepton_spark.errors import ScoringError
    from lepton_spark.serving.output import MARKER

    rng = np.random.default_rng(2)
    outputs = []
    destination = s3.uri("scores/daily")
    for round_, rows in enumerate((1200, 700)):
        frame = pd.DataFrame(
            {
                "id": np.arange(rows) + 10_000 * round_,
                "x": rng.normal(size=rows),
                "y": rng.normal(size=rows),
                "c": rng.choice(["p", "q", "r"], rows),
            }
        )
        table = tmp_path / f"input-{round_}.parquet"
        spark.createDataFrame(frame).repartition(3).write.parquet(str(table))
        result = score(spark, logged, str(table), destination, keys=["id"], overwrite=round_ > 0)
        assert result.rows == rows
        filesystem, path = pafs.FileSystem.from_uri(result.output)
        read = pq.read_table(path, filesystem=filesystem).to_pandas()
        assert sorted(read["id"]) == list(frame["id"])
        expected = mlflow.pyfunc.load_model(logged).predict(frame.set_index("id").loc[read["id"]])
        assert read["prediction"].tolist() == expected["prediction"].tolist()
        outputs.append(result.output)
        if round_ == 0:
            with pytest.raises(ScoringError, match="exists; --overwrite"):
                score(spark, logged, str(table), destination, keys=["id"])

    filesystem, prefix = pafs.FileSystem.from_uri(destination)
    left = sorted(i.base_name for i in filesystem.get_file_info(pafs.FileSelector(prefix)))
    assert left == sorted([MARKER, outputs[1].split("?")[0].rsplit("/", 1)[-1]])
    assert outputs[0] != outputs[1]
