"""A pretrained Hugging Face model fine-tuned in the barrier stage: a tiny BERT made here
(tests/hf_fixture.py), text tokenised on the executors with its own tokenizer, DDP and FSDP, a
killed rank resumed, and the logged model predicting from raw text."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from lepton_spark import events, run_pipeline
from lepton_spark.config import PipelineConfig
from lepton_spark.data.datagen import topic_vocabulary
from tests.hf_fixture import TOPICS, make_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def texts_and_topics(seed: int = 0, rows: int = 40) -> pd.DataFrame:
    """Documents written here, not drawn from the training table: each mostly one topic's
    words, some common words in between."""
    own, common = topic_vocabulary(TOPICS)
    rng = np.random.default_rng(seed)
    topics = rng.integers(0, len(own), rows)
    docs = [" ".join([*rng.choice(own[t], 6), *rng.choice(common, 4)]) for t in topics.tolist()]
    return pd.DataFrame({"id": range(rows), "text": docs, "topic": topics})


def config(tmp_path, bert, backend: str, **train) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": f"hf-{backend}",
            "spark": {"master": "local[2]"},
            "sources": {"docs": {"generate": TOPICS.model_dump()}},
            "features": {
                "text": [{"name": "text", "max_length": 32}],
                "label": "label",
                "num_classes": 4,
            },
            "shards": {"root": str(tmp_path / "shards")},
            "train": {
                "num_workers": 2,
                "epochs": 2,
                "batch_size": 32,
                "lr": 0.002,
                "backend": backend,
                "checkpoint_root": str(tmp_path / "checkpoints"),
                **train,
            },
            "model": {"name": "hf", "pretrained": str(bert)},
            "tracking": {
                "local_store": str(tmp_path / "mlruns-data"),
                "system_metrics_interval_s": None,
            },
        }
    )


@pytest.mark.slow
def test_ddp_fine_tunes_it_and_the_logged_model_predicts_from_raw_text(spark, bert, tmp_path):
    cfg = config(tmp_path, bert, "ddp")
    assert cfg.features.text[0].tokenizer == str(bert)  # the model's own tokenizer
    result = run_pipeline(cfg, spark=spark, progress=lambda e: None)
    assert result.metrics["val/accuracy"] >= 0.9

    docs = texts_and_topics()
    mlflow.set_tracking_uri(result.tracking_uri)
    served = mlflow.pyfunc.load_model(result.model_uri).predict(docs[["text"]])
    assert (served.prediction.to_numpy() == docs.topic.to_numpy()).mean() >= 0.9

    # The score command: raw text in Parquet, predictions out, the tokenizer the model carries.
    from lepton_spark.serving.batch import score

    docs.to_parquet(tmp_path / "docs.parquet")
    scored = score(spark, result.model_uri, str(tmp_path / "docs.parquet"), str(tmp_path / "out"))
    assert scored.rows == len(docs)
    out = pd.read_parquet(tmp_path / "out").sort_values("id")
    assert out.prediction.tolist() == served.prediction.tolist()

    # MLflow's transformers flavor, logged beside it, gives the same classes (LABEL_<index>).
    from lepton_spark.names import TAG_TRANSFORMERS_MODEL_URI

    tags = mlflow.get_run(result.run_id).data.tags
    pipe = mlflow.transformers.load_model(tags[TAG_TRANSFORMERS_MODEL_URI])
    labels = [int(p["label"].removeprefix("LABEL_")) for p in pipe(docs.text.tolist())]
    assert (np.array(labels) == docs.topic.to_numpy()).mean() >= 0.9

    # TorchModel.transform, Spark ML's way: the same raw text as a DataFrame, the same answers.
    from lepton_spark.ml import TorchModel

    model = TorchModel.from_mlflow(result.model_uri, tracking_uri=result.tracking_uri)
    frame = model.transform(spark.createDataFrame(docs[["id", "text"]]))
    rows = frame.select("id", "prediction", "probability").toPandas().sort_values("id")
    assert rows.prediction.astype(int).tolist() == served.prediction.tolist()
    assert all(abs(sum(p.toArray()) - 1) < 1e-5 for p in rows.probability)


@pytest.mark.slow
def test_fsdp_shards_its_layers_and_a_killed_rank_resumes(spark, bert, tmp_path):
    from lepton_spark.models import build_model
    from lepton_spark.training.engines import fsdp_blocks

    cfg = config(
        tmp_path, bert, "fsdp", checkpoint_every_steps=20, fault_inject="kill:1:50", retries=1
    )
    seen: list[events.Event] = []
    result = run_pipeline(cfg, spark=spark, progress=seen.append)
    starts = [e for e in seen if isinstance(e, events.Start)]
    assert [e.attempt for e in starts] == [0, 1]
    assert starts[1].resumed_from == (0, 40)  # from the sharded checkpoint, not step 0
    assert result.metrics["val/accuracy"] >= 0.9

    # FSDP wraps the encoder's layers one by one (and the embeddings), then the whole model.
    from lepton_spark.shards.manifest import read_manifest

    folder = next((tmp_path / "shards").iterdir())
    network = build_model(cfg.model, read_manifest(str(folder)).feature_spec)
    assert [type(b).__name__ for b in fsdp_blocks(network)].count("BertLayer") == 2

    docs = texts_and_topics(seed=1)
    mlflow.set_tracking_uri(result.tracking_uri)
    served = mlflow.pyfunc.load_model(result.model_uri).predict(docs[["text"]])
    assert (served.prediction.to_numpy() == docs.topic.to_numpy()).mean() >= 0.9


@pytest.mark.slow
def test_the_estimator_fine_tunes_it_on_a_dataframe_of_raw_text(spark, bert, tmp_path):
    from lepton_spark.ml import TorchEstimator

    train = spark.createDataFrame(texts_and_topics(seed=2, rows=3000).drop(columns="id"))
    estimator = TorchEstimator(
        model="hf",
        pretrained=str(bert),
        text=[{"name": "text", "max_length": 32}],
        labelCol="topic",
        num_classes=4,
        num_workers=2,
        epochs=2,
        batch_size=32,
        lr=0.002,
        shards_root=str(tmp_path / "shards"),
        checkpoint_root=str(tmp_path / "checkpoints"),
        local_store=str(tmp_path / "mlruns-data"),
        system_metrics_interval_s=None,
        name="hf-estimator",
    ).with_progress(lambda e: None)
    model = estimator.fit(train)
    assert model.metrics["val/accuracy"] >= 0.9
    docs = texts_and_topics(seed=3)  # documents the model never saw
    out = model.transform(spark.createDataFrame(docs)).select("id", "prediction").toPandas()
    out = out.sort_values("id")
    assert (out.prediction.astype(int).to_numpy() == docs.topic.to_numpy()).mean() >= 0.9
