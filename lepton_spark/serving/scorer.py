"""A network and its preprocessing: predictions for raw Arrow or pandas input.

Classification: ``prediction`` (the class) and ``probabilities``; regression: ``prediction`` (the
value); clustering: ``prediction`` (the nearest centroid) and ``distances`` (squared).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from lepton_spark.serving import network_file
from lepton_spark.serving.preprocess import Columnar, Preprocessor
from lepton_spark.spec import FeatureSpec

SPEC_ARTIFACT = "feature_spec"  # the served model's artifacts (see lepton_spark.serving.pyfunc)
SPEC_FILE = "feature_spec.json"
WEIGHTS_ARTIFACT = "weights"  # the network without pickle (lepton_spark.serving.network_file)
NETWORK_ARTIFACT = "network"  # models logged before WEIGHTS_ARTIFACT: an mlflow.pytorch pickle


PREDICTION = "prediction"

PROBABILITIES = "probabilities"

DISTANCES = "distances"


def list_column(matrix: np.ndarray, dtype: type = np.float32) -> pa.Array:
    """A ``[rows, width]`` matrix as an Arrow list column of ``dtype``."""
    rows, width = matrix.shape
    flat = pa.array(matrix.reshape(-1).astype(dtype))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, width * rows + 1, width, np.int32)), flat)


class Scorer:
    """A network and its preprocessing: predictions for raw Arrow or pandas input.

    Classification: ``prediction`` (the class) and ``probabilities``; regression: ``prediction``
    (the value); clustering: ``prediction`` (the nearest centroid) and ``distances`` (squared).
    """

    def __init__(self, spec: FeatureSpec, network: torch.nn.Module) -> None:
        self.spec = spec
        self.preprocess = Preprocessor(spec)
        self.network = network.eval()

    def outputs(self, data: Columnar | pd.DataFrame) -> np.ndarray:
        """The network's raw outputs ``[rows, outputs]``."""
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        inputs = {k: torch.from_numpy(v) for k, v in self.preprocess(data).items()}
        with torch.inference_mode():
            return self.network(inputs).float().numpy()

    def probabilities(self, data: Columnar | pd.DataFrame) -> np.ndarray:
        return _softmax(self.outputs(data))

    def predict(self, data: Columnar | pd.DataFrame) -> dict[str, np.ndarray]:
        outputs = self.outputs(data)
        task = self.spec.task
        if task == "classification":
            probabilities = _softmax(outputs)
            return {PREDICTION: probabilities.argmax(axis=1), PROBABILITIES: probabilities}
        if task == "regression":
            return {PREDICTION: outputs[:, 0].astype(np.float64)}
        return {PREDICTION: outputs.argmax(axis=1), DISTANCES: -outputs}

    def predict_spark_ml(self, data: Columnar | pd.DataFrame) -> dict[str, np.ndarray]:
        """Predictions as Spark ML's models give them: ``raw``, ``probability`` and a double
        ``prediction`` for classification; a double ``prediction`` for regression; an integer
        cluster for k-means.

        ``raw`` are the logits less their mean over the classes: the same softmax, and for two
        classes ``[-m, m]`` like Spark's logistic regression, so that its element 1 ranks the
        rows as the probability of class 1 does (what ``BinaryClassificationEvaluator`` reads).
        """
        outputs = self.outputs(data).astype(np.float64)
        task = self.spec.task
        if task == "classification":
            probabilities = _softmax(outputs).astype(np.float64)
            return {
                "raw": outputs - outputs.mean(axis=1, keepdims=True),
                "probability": probabilities,
                "prediction": probabilities.argmax(axis=1).astype(np.float64),
            }
        if task == "regression":
            return {"prediction": outputs[:, 0]}
        return {"prediction": outputs.argmax(axis=1).astype(np.int32)}

    def predict_frame(self, data: Columnar | pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {k: v if v.ndim == 1 else list(v) for k, v in self.predict(data).items()}
        )

    def predict_arrow(
        self, batch: pa.RecordBatch, keys: list[str], source: pa.RecordBatch | None = None
    ) -> pa.RecordBatch:
        """``keys`` columns as they are (of ``source``, default ``batch``), then the
        predictions of ``batch``."""
        predicted = self.predict(batch)
        columns = [pa.array(v) if v.ndim == 1 else list_column(v) for v in predicted.values()]
        keyed = batch if source is None else source
        return pa.RecordBatch.from_arrays(
            [*(keyed.column(name) for name in keys), *columns],
            names=[*keys, *predicted],
        )


def output_columns(spec: FeatureSpec) -> list[tuple[str, str]]:
    """The prediction columns and their Spark SQL types, per task."""
    if spec.task == "classification":
        return [(PREDICTION, "bigint"), (PROBABILITIES, "array<float>")]
    if spec.task == "regression":
        return [(PREDICTION, "double")]
    return [(PREDICTION, "bigint"), (DISTANCES, "array<float>")]


def _softmax(outputs: np.ndarray) -> np.ndarray:
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def load_scorer(model_dir: str | Path) -> Scorer:
    """A :class:`Scorer` from a downloaded model folder (what :func:`log_model` wrote)."""
    artifacts = Path(model_dir) / "artifacts"
    spec = FeatureSpec.model_validate_json((artifacts / SPEC_FILE).read_text())
    found = {p.name: str(p) for p in artifacts.iterdir()}
    return Scorer(spec, load_network(found, spec))


def load_network(artifacts: Mapping[str, str], spec: FeatureSpec) -> nn.Module:
    """The served model's network from its artifacts (name → local path): safetensors weights
    and an architecture record, or, in a model logged before those, an ``mlflow.pytorch`` pickle
    (which MLflow refuses to load under ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``)."""
    if WEIGHTS_ARTIFACT in artifacts:
        return network_file.load(Path(artifacts[WEIGHTS_ARTIFACT]), spec)
    import mlflow.pytorch

    return mlflow.pytorch.load_model(artifacts[NETWORK_ARTIFACT], map_location="cpu")
