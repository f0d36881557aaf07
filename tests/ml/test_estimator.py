"""TorchEstimator / TorchModel as a Spark ML user meets them, on classic Spark and Spark Connect.

The DataFrame is what a notebook builds: two CSV files read by Spark, joined and cleaned there.
Every test here runs twice: ``make test`` runs the file again with ``--spark-mode=connect``.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
from pyspark.ml.feature import SQLTransformer, StringIndexer, VectorAssembler
from pyspark.ml.tuning import ParamGridBuilder, TrainValidationSplit
from pyspark.sql import functions as F

from lepton_spark import TorchEstimator, TorchModel
from lepton_spark.data.columns import is_vector
from lepton_spark.errors import ConfigError, DataError, ScoringError
from tests.helpers import store_runs

pytestmark = pytest.mark.connect
ROWS = 3000


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory):
    """facts.csv (id, a, b, store_id, label) and stores.csv (store_id, city): the label needs
    the join (the city flips the sign of b)."""
    folder = tmp_path_factory.mktemp("csv")
    rng = np.random.default_rng(5)
    stores = pd.DataFrame({"store_id": range(6), "city": ["x", "y", "z", "x", "y", "z"]})
    facts = pd.DataFrame(
        {
            "id": range(ROWS),
            "a": rng.normal(size=ROWS),
            "b": rng.normal(size=ROWS),
            "store_id": rng.integers(0, 6, ROWS),
        }
    )
    sign = np.where(stores.city.to_numpy()[facts.store_id] == "x", 1.0, -1.0)
    facts["label"] = ((facts.a + sign * facts.b) > 0).astype(int)
    facts.loc[7, "a"] = None  # a row to clean in Spark
    facts.to_csv(folder / "facts.csv", index=False)
    stores.to_csv(folder / "stores.csv", index=False)
    return folder


def user_frame(spark, folder):
    """What a user's notebook does: read, join, clean."""
    read = spark.read.option("header", "true").option("inferSchema", "true")
    facts, stores = read.csv(str(folder / "facts.csv")), read.csv(str(folder / "stores.csv"))
    return facts.join(stores, "store_id").dropna()


def estimator(tmp_path, **params):
    settings = {
        "labelCol": "label",
        "epochs": 3,
        "batch_size": 64,
        "lr": 0.01,
        "hidden": [16],
        "shards_root": str(tmp_path / "shards"),
        "checkpoint_root": str(tmp_path / "checkpoints"),
        "local_store": str(tmp_path / "mlruns-data"),
        "system_metrics_interval_s": None,
        "name": "estimator-test",
    }
    return TorchEstimator(**{**settings, **params}).with_progress(lambda e: None)


def test_a_spark_ml_pipeline_fits_transforms_evaluates_saves_and_loads(
    spark, horovod, csv_files, tmp_path
):
    df = user_frame(spark, csv_files)
    pipeline = Pipeline(
        stages=[
            SQLTransformer(statement="SELECT *, a * b AS ab FROM __THIS__"),
            StringIndexer(inputCol="city", outputCol="city_index"),
            VectorAssembler(inputCols=["a", "b", "ab", "city_index"], outputCol="features"),
            estimator(tmp_path, featuresCol="features", categorical=["city"]),
        ]
    )
    fitted = pipeline.fit(df)
    model = fitted.stages[-1]
    assert isinstance(model, TorchModel) and model.metrics["val/accuracy"] > 0.8

    scored = fitted.transform(df)
    fields = {f.name: f.dataType for f in scored.schema.fields}
    assert fields["prediction"].typeName() == "double"
    assert is_vector(fields["probability"]) and is_vector(fields["rawPrediction"])
    assert set(df.columns) <= set(scored.columns)  # every input column kept
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(scored)
    auc = BinaryClassificationEvaluator().evaluate(scored)
    assert accuracy > 0.8 and auc > 0.85

    # Row by row the same as the logged model, loaded in one process with mlflow.pyfunc.
    features = fitted.stages[2].transform(
        fitted.stages[1].transform(fitted.stages[0].transform(df))
    )
    rows = features.select("id", "features", "city").toPandas().sort_values("id")
    rows["features"] = rows["features"].map(lambda v: v.toArray().tolist())
    mlflow.set_tracking_uri(model.getOrDefault(model.trackingUri))
    pyfunc = mlflow.pyfunc.load_model(model.getOrDefault(model.modelUri))
    expected = np.stack(pyfunc.predict(rows[["features", "city"]])["probabilities"].to_numpy())
    ours = scored.select("id", "probability").toPandas().sort_values("id")
    np.testing.assert_allclose(
        np.stack(ours["probability"].map(lambda v: v.toArray())), expected, atol=1e-6
    )

    # Saved and loaded, as a whole pipeline and from MLflow: the same predictions.
    fitted.write().overwrite().save(str(tmp_path / "saved"))
    again = PipelineModel.load(str(tmp_path / "saved")).transform(df)
    from_mlflow = TorchModel.from_mlflow(model.getOrDefault(model.modelUri)).transform(
        fitted.stages[2].transform(fitted.stages[1].transform(fitted.stages[0].transform(df)))
    )
    for other in (again, from_mlflow):
        predicted = other.select("id", "prediction", "probability").toPandas().sort_values("id")
        assert predicted["prediction"].tolist() == ours_predictions(scored)
        np.testing.assert_allclose(
            np.stack(predicted["probability"].map(lambda v: v.toArray())), expected, atol=1e-6
        )
    with pytest.raises(ScoringError, match="already has column"):
        model.transform(scored)  # its output columns are there already

    # The run: the dataset as its input, digest = the fingerprint the shards were found by.
    client = MlflowClient(model.getOrDefault(model.trackingUri))
    run = client.get_run(model.getOrDefault(model.runId))
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == run.data.tags["dataset.fingerprint"][:32]
    assert str(csv_files) in json.loads(dataset.dataset.source)["path"]  # the CSVs' folder
    assert run.data.tags["shards.reused"] == "false"

    # The same DataFrame fitted twice: the second fit finds its shards by the plan's
    # fingerprint (the first may already find the pipeline's own: on Connect that is the same
    # query, the same transformers over the same input).
    fits = [
        estimator(tmp_path, featuresCol="features", categorical=["city"], epochs=1).fit(features)
        for _ in range(2)
    ]
    reused = [client.get_run(m.getOrDefault(m.runId)).data.tags["shards.reused"] for m in fits]
    assert reused[1] == "true"


def ours_predictions(scored) -> list[float]:
    return scored.select("id", "prediction").toPandas().sort_values("id")["prediction"].tolist()


def test_train_validation_split_picks_the_better_learning_rate(spark, horovod, csv_files, tmp_path):
    df = user_frame(spark, csv_files).withColumn("ab", F.col("a") * F.col("b"))
    est = estimator(tmp_path, numeric=["a", "b", "ab"], categorical=["city"], epochs=2)
    grid = ParamGridBuilder().addGrid(est.lr, [1e-6, 0.02]).build()
    search = TrainValidationSplit(
        estimator=est,
        estimatorParamMaps=grid,
        evaluator=MulticlassClassificationEvaluator(metricName="accuracy"),
        trainRatio=0.8,
        seed=3,
    )
    best = search.fit(df)
    assert best.validationMetrics[1] > best.validationMetrics[0] + 0.1
    runs = store_runs(tmp_path / "mlruns-data", "estimator-test")
    parents = [r for r in runs if "lepton.search" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [1e-6, 0.02]
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_bad_input_is_named_and_leaves_nothing_behind(spark, csv_files, tmp_path):
    df = user_frame(spark, csv_files)
    cases = [
        (estimator(tmp_path, numeric=["a", "nope"]), df, DataError, "nope"),
        (estimator(tmp_path, numeric=["a", "city"]), df, DataError, "'city' has Spark type string"),
        (estimator(tmp_path, numeric=["a"]), df.where("a > 100"), DataError, "empty"),
        (
            estimator(tmp_path, numeric=["a"], num_classes=2),
            df.withColumn("label", F.col("label") + 3),
            DataError,
            "outside [0, 2)",
        ),
        (estimator(tmp_path, numeric=["a"], labelCol="gone"), df, DataError, "gone"),
    ]
    for est, frame, error, named in cases:
        with pytest.raises(error, match=None) as failed:
            est.fit(frame)
        assert named in str(failed.value), str(failed.value)
    streaming = spark.readStream.format("rate").load()
    with pytest.raises(DataError, match="streaming"):
        estimator(tmp_path, numeric=["value"]).fit(streaming)
    with pytest.raises(TypeError, match='param "lr"'):
        TorchEstimator(lr=-1.0)
    with pytest.raises(TypeError, match="no param 'learning_rate'"):
        TorchEstimator(learning_rate=0.1)
    with pytest.raises(ConfigError, match="param 'model'"):
        estimator(tmp_path, numeric=["a"], model="kmeans").fit(df)  # kmeans is for clustering
    # A search whose first candidate is invalid stops there: the error, then no more candidates.
    est = estimator(tmp_path, numeric=["a"])
    search = est.fitMultiple(df, [{est.model: "kmeans"}, {est.lr: 0.01}])
    with pytest.raises(ConfigError, match="param 'model'"):
        next(search)
    with pytest.raises(RuntimeError, match="a candidate failed"):
        next(search)
    shards = tmp_path / "shards"
    assert not shards.exists() or not any(shards.iterdir())
    assert not [
        r
        for r in store_runs(tmp_path / "mlruns-data", "estimator-test")
        if r.info.status == "RUNNING"
    ]
