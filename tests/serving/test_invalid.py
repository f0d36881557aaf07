"""Rows training would have refused, at scoring time: ``handleInvalid`` everywhere a model predicts.

One model is trained with ``nulls: drop`` (TorchEstimator, default params, a feature in the
thousands); it scores a table where 10% of one numeric feature is null, and the same table with
nothing missing, by ``TorchModel.transform`` (classic and Connect), ``lepton-spark score`` and the
pyfunc model. A second model, trained with ``nulls: fill``, fills a missing value as training did.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
import pytest
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F

from lepton_spark import TorchEstimator
from lepton_spark.errors import ScoringError
from tests.helpers import run_cli

TRAIN_ROWS = 3000
SCORE_ROWS = 400
FILL = 2.5


def table(rows: int, seed: int) -> pd.DataFrame:
    """a, b: standard normals; c: in the thousands. The label needs all three."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "a": rng.normal(size=rows),
            "b": rng.normal(size=rows),
            "c": rng.normal(5000.0, 1000.0, size=rows),
        }
    )
    frame["label"] = ((frame.a + frame.b + (frame.c - 5000.0) / 1000.0) > 0).astype(np.int64)
    return frame


CLEAN = table(SCORE_ROWS, seed=11)
HOLED_IDS = sorted(CLEAN.id[CLEAN.id % 10 == 3].tolist())  # 40 rows: 10%


def holed() -> pd.DataFrame:
    frame = CLEAN.copy()
    frame.loc[frame.id.isin(HOLED_IDS), "a"] = np.nan
    return frame


def estimator(folder, **params) -> TorchEstimator:
    settings = {
        "numeric": ["a", "b", "c"],
        "labelCol": "label",
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.01,
        "hidden": [16],
        "shards_root": str(folder / "shards"),
        "checkpoint_root": str(folder / "checkpoints"),
        "local_store": str(folder / "mlruns-data"),
        "system_metrics_interval_s": None,
        "name": "invalid-test",
    }
    return TorchEstimator(**{**settings, **params}).with_progress(lambda e: None)


@pytest.fixture(scope="module")
def dropped(spark, horovod, tmp_path_factory):
    """A model trained with ``nulls: drop`` (30 training rows have a null ``a``), default
    params otherwise."""
    train = table(TRAIN_ROWS, seed=3)
    train.loc[train.index[:30], "a"] = np.nan
    folder = tmp_path_factory.mktemp("dropped")
    return estimator(folder, nulls="drop").fit(spark.createDataFrame(train.drop(columns="id")))


def predictions(model, spark, frame: pd.DataFrame) -> pd.DataFrame:
    probability = F.when(F.col("probability").isNotNull(), vector_to_array("probability"))
    out = model.transform(spark.createDataFrame(frame)).select(
        "id", "prediction", probability.alias("probability")
    )
    return out.toPandas().sort_values("id").set_index("id")


@pytest.mark.connect
def test_transform_keeps_skips_or_refuses_the_rows_with_a_missing_number(dropped, spark, caplog):
    expected = predictions(dropped, spark, CLEAN)
    assert expected.prediction.notna().all()
    assert dropped.invalid_policy() == "keep"  # what training with nulls: drop gives

    with caplog.at_level(logging.WARNING, logger="lepton_spark.ml.model"):
        kept = predictions(dropped, spark, holed())  # handleInvalid unset: the model's own
    assert "40 rows have invalid features (a: 40)" in caplog.text
    assert len(kept) == SCORE_ROWS
    assert kept.index[kept.prediction.isna()].tolist() == HOLED_IDS
    assert kept.index[kept.probability.isna()].tolist() == HOLED_IDS
    good = kept.drop(index=HOLED_IDS)
    assert good.prediction.tolist() == expected.drop(index=HOLED_IDS).prediction.tolist()
    np.testing.assert_allclose(
        np.stack(good.probability), np.stack(expected.drop(index=HOLED_IDS).probability), rtol=1e-5
    )
    assert predictions(dropped.copy().setHandleInvalid("keep"), spark, holed()).equals(kept)

    skipped = predictions(dropped.copy().setHandleInvalid("skip"), spark, holed())
    assert len(skipped) == SCORE_ROWS - len(HOLED_IDS)
    assert skipped.prediction.tolist() == good.prediction.tolist()

    with pytest.raises(ScoringError, match=r"40 rows have invalid features.*a: 40.*'error'"):
        predictions(dropped.copy().setHandleInvalid("error"), spark, holed())
    with pytest.raises(ScoringError, match="never saw a filled value"):
        predictions(dropped.copy().setHandleInvalid("fill"), spark, holed())


def test_the_pyfunc_model_keeps_skips_or_refuses_them(dropped):
    mlflow.set_tracking_uri(dropped.getOrDefault(dropped.trackingUri))
    model = mlflow.pyfunc.load_model(dropped.getOrDefault(dropped.modelUri))
    features = ["a", "b", "c"]
    expected = model.predict(CLEAN[features])

    kept = model.predict(holed()[features])
    assert len(kept) == SCORE_ROWS
    assert kept.index[kept.prediction.isna()].tolist() == HOLED_IDS
    assert kept.index[kept.probabilities.isna()].tolist() == HOLED_IDS
    good = kept.drop(index=HOLED_IDS)
    assert good.prediction.tolist() == expected.drop(index=HOLED_IDS).prediction.tolist()
    assert model.predict(holed()[features], params={"handleInvalid": "keep"}).equals(kept)

    skipped = model.predict(holed()[features], params={"handleInvalid": "skip"})
    assert skipped.index.tolist() == good.index.tolist()
    assert skipped.prediction.tolist() == good.prediction.tolist()

    with pytest.raises(ValueError, match=r"40 of 400 rows have invalid features.*a: 40"):
        model.predict(holed()[features], params={"handleInvalid": "error"})


def test_the_score_command_says_the_counts_and_applies_the_policy(dropped, spark, tmp_path):
    from lepton_spark.serving.batch import score

    uri = dropped.getOrDefault(dropped.modelUri)
    mlflow.set_tracking_uri(dropped.getOrDefault(dropped.trackingUri))
    clean_path, holed_path = str(tmp_path / "clean.parquet"), str(tmp_path / "holed.parquet")
    CLEAN.to_parquet(clean_path)
    holed().to_parquet(holed_path)
    score(spark, uri, clean_path, str(tmp_path / "expected"), keys=["id"])
    expected = pd.read_parquet(tmp_path / "expected").sort_values("id").set_index("id")

    result = score(spark, uri, holed_path, str(tmp_path / "kept"), keys=["id"])
    assert (result.handle_invalid, result.invalid_rows, result.invalid) == ("keep", 40, {"a": 40})
    kept = pd.read_parquet(tmp_path / "kept").sort_values("id").set_index("id")
    assert result.rows == len(kept) == SCORE_ROWS
    assert kept.index[kept.prediction.isna()].tolist() == HOLED_IDS
    assert kept.index[kept.probabilities.isna()].tolist() == HOLED_IDS
    good = kept.drop(index=HOLED_IDS)
    assert good.prediction.tolist() == expected.drop(index=HOLED_IDS).prediction.tolist()

    with pytest.raises(ScoringError, match=r"40 rows.*a: 40"):
        score(spark, uri, holed_path, str(tmp_path / "refused"), handle_invalid="error")
    assert not (tmp_path / "refused").exists()  # nothing written

    done = run_cli(
        "score",
        "--model",
        uri,
        "--input",
        holed_path,
        "--output",
        str(tmp_path / "skipped"),
        "--key",
        "id",
        "--invalid",
        "skip",
        "--master",
        "local[2]",
        "--tracking-uri",
        dropped.getOrDefault(dropped.trackingUri),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "rows with invalid features: 40 (a: 40): they are left out (--invalid skip)" in said
    skipped = pd.read_parquet(tmp_path / "skipped").sort_values("id").set_index("id")
    assert skipped.index.tolist() == good.index.tolist()
    assert skipped.prediction.tolist() == good.prediction.tolist()


def test_default_params_standardise_a_feature_in_the_thousands(dropped, spark, tmp_path, caplog):
    """The default fit (standardisation on for an MLP) is within 0.5 points of one that sets it,
    and the run says which it used."""
    train = table(TRAIN_ROWS, seed=3)
    train.loc[train.index[:30], "a"] = np.nan
    chosen = estimator(tmp_path, nulls="drop", standardize=True).fit(
        spark.createDataFrame(train.drop(columns="id"))
    )
    assert abs(dropped.metrics["val/accuracy"] - chosen.metrics["val/accuracy"]) <= 0.005
    assert dropped.metrics["val/accuracy"] > 0.9
    with caplog.at_level(logging.WARNING, logger="lepton_spark.data.quality"):
        unscaled = estimator(tmp_path, nulls="drop", standardize=False).fit(
            spark.createDataFrame(train.drop(columns="id"))
        )
    said = [r.getMessage() for r in caplog.records]
    warned = [m for m in said if "standard deviation above" in m]
    assert len(warned) == 1 and "'c' (" in warned[0] and "'a'" not in warned[0], said
    # What the old default (off) gave here: the network does not learn c at all.
    assert unscaled.metrics["val/accuracy"] < dropped.metrics["val/accuracy"] - 0.1
    params = mlflow.MlflowClient(dropped.getOrDefault(dropped.trackingUri)).get_run(
        dropped.getOrDefault(dropped.runId)
    )
    assert params.data.params["features.standardize"] == "true"
    assert set(dropped.feature_spec.standardize) == {"a", "b", "c"}


@pytest.fixture(scope="module")
def filled(spark, horovod, tmp_path_factory):
    train = table(TRAIN_ROWS, seed=4)
    train.loc[train.index[:150], "a"] = np.nan
    folder = tmp_path_factory.mktemp("filled")
    return estimator(folder, nulls="fill", fill_value=FILL).fit(
        spark.createDataFrame(train.drop(columns="id"))
    )


def test_a_model_trained_with_fill_scores_a_missing_value_as_the_fill_value(filled, spark):
    assert filled.invalid_policy() == "fill"
    by_hand = CLEAN.copy()
    by_hand.loc[by_hand.id.isin(HOLED_IDS), "a"] = FILL  # raw units, before standardisation
    expected = predictions(filled, spark, by_hand)
    got = predictions(filled, spark, holed())
    assert got.prediction.notna().all()
    assert got.prediction.tolist() == expected.prediction.tolist()
    np.testing.assert_allclose(np.stack(got.probability), np.stack(expected.probability), rtol=1e-6)
    # The statistics were computed after the fill, as the network saw the rows.
    assert filled.feature_spec.standardize["a"].mean > 0.05  # 5% of the rows at 2.5

    mlflow.set_tracking_uri(filled.getOrDefault(filled.trackingUri))
    pyfunc = mlflow.pyfunc.load_model(filled.getOrDefault(filled.modelUri))
    features = ["a", "b", "c"]
    np.testing.assert_allclose(
        np.stack(pyfunc.predict(holed()[features]).probabilities),
        np.stack(pyfunc.predict(by_hand[features]).probabilities),
        rtol=1e-6,
    )
    kept = predictions(filled.copy().setHandleInvalid("keep"), spark, holed())
    assert kept.index[kept.prediction.isna()].tolist() == HOLED_IDS


def test_spark_udf_on_the_pyfunc_model_gives_null_predictions_for_them(dropped, spark):
    """A UDF gives one value per row: ``keep`` (the default) works there; ``skip`` cannot."""
    tracking = dropped.getOrDefault(dropped.trackingUri)
    mlflow.set_tracking_uri(tracking)
    # MLflow casts a UDF's integer field with numpy, which has no null: a double prediction.
    udf = mlflow.pyfunc.spark_udf(
        spark,
        dropped.getOrDefault(dropped.modelUri),
        result_type="prediction double, probabilities array<double>",
        env_manager="local",
    )
    frame = spark.createDataFrame(holed())
    out = frame.select("id", udf("a", "b", "c").alias("p")).select("id", "p.*")
    got = out.toPandas().sort_values("id").set_index("id")
    assert len(got) == SCORE_ROWS
    assert got.index[got.prediction.isna()].tolist() == HOLED_IDS
    assert got.index[got.probabilities.isna()].tolist() == HOLED_IDS
    expected = mlflow.pyfunc.load_model(dropped.getOrDefault(dropped.modelUri)).predict(
        holed()[["a", "b", "c"]]
    )
    assert got.prediction.dropna().tolist() == expected.prediction.dropna().tolist()
