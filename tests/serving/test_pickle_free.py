"""The served model without pickle: the network as safetensors weights and an architecture record,
the pyfunc model built from code; it loads and predicts with MLFLOW_ALLOW_PICKLE_DESERIALIZATION
set to false, and models logged as pickles still load where pickles are allowed."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from lepton_spark.config.schema import CompressConfig, ModelConfig
from lepton_spark.models import build_model
from lepton_spark.serving import network_file
from lepton_spark.serving.compression import compress
from lepton_spark.serving.pyfunc import log_model, pip_requirements
from lepton_spark.serving.scorer import Scorer, load_scorer
from tests.helpers import ROOT
from tests.serving.test_batch import SPEC

MODEL = ModelConfig(hidden=[16, 8], embedding_dim=3)
EXAMPLE = pd.DataFrame({"x": [0.5, 1.0, -3.0], "y": [2.0, -1.0, 0.0], "c": ["p", "zz", None]})


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "numeric": torch.randn(64, 2, generator=generator),
        "categorical": torch.randint(0, 4, (64, 1), generator=generator),
    }


@pytest.mark.parametrize(
    "compression",
    [None, CompressConfig(prune=0.5), CompressConfig(quantize=True, prune=0.3)],
    ids=["trained", "pruned", "quantized"],
)
def test_a_network_saved_without_pickle_loads_with_the_same_outputs(tmp_path, compression):
    network = build_model(MODEL, SPEC, seed=0).eval()
    if compression is not None:
        network = compress(network, compression)
    network_file.save(network, MODEL, tmp_path / "weights")
    loaded = network_file.load(tmp_path / "weights", SPEC)

    with torch.inference_mode():
        torch.testing.assert_close(loaded(_inputs()), network(_inputs()), rtol=0, atol=0)
    assert network_file.is_quantized(loaded) == (compression is not None and compression.quantize)
    # The weights file is safetensors (an 8-byte header length, then JSON), nothing else.
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
        network_file.ARCHITECTURE_FILE,
        network_file.WEIGHTS_FILE,
    ]
    raw = (tmp_path / "weights" / network_file.WEIGHTS_FILE).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == network_file.FORMAT


def test_an_architecture_record_of_another_format_is_refused(tmp_path):
    network_file.save(build_model(MODEL, SPEC, seed=0), MODEL, tmp_path)
    record = json.loads((tmp_path / network_file.ARCHITECTURE_FILE).read_text())
    record["format"] = "something-else/v9"
    (tmp_path / network_file.ARCHITECTURE_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="something-else/v9"):
        network_file.load(tmp_path, SPEC)


def test_a_logged_model_loads_and_predicts_with_pickle_deserialization_off(tmp_path, monkeypatch):
    network = compress(build_model(MODEL, SPEC, seed=0).eval(), CompressConfig(quantize=True))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("nopickle", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        uri = log_model(network, MODEL, SPEC, EXAMPLE, pip_requirements=pip_requirements())
    expected, _ = Scorer(SPEC, network).predict_frame(EXAMPLE)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(EXAMPLE)

    assert out["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_array_equal(
        np.stack(out["probabilities"].to_numpy()), np.stack(expected["probabilities"].to_numpy())
    )
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    pickles = [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pth", ".pt")]
    assert pickles == []
    assert "model_code_path" in (local / "MLmodel").read_text()
    # Batch scoring reads the same folder.
    again, _ = load_scorer(local).predict_frame(EXAMPLE)
    assert again["prediction"].tolist() == expected["prediction"].tolist()


def test_a_model_logged_as_a_pickle_is_refused_with_pickles_off(monkeypatch):
    """With pickles allowed (MLflow's default) it loads and predicts as it did:
    tests/serving/test_legacy_model.py."""
    legacy = ROOT / "tests" / "fixtures" / "legacy_model"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="pickle"):
        mlflow.pyfunc.load_model(str(legacy))
