"""Batch scoring on Spark, classic and Connect: the same predictions as the pyfunc model, the model
loaded once per Python worker, and the output replaced only by a whole one."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from lepton_spark.models import TabularMLP
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
    torch.manual_seed(0)
    network = TabularMLP(SPEC, hidden=[8], embedding_dim=2).eval()
    example = pd.DataFrame({"x": [0.5, 1.0], "y": [2.0, -1.0], "c": ["p", "zz"]})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("scoring", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        return log_model(network, SPEC, example, pip_requirements=pip_requirements())


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
