"""A network and its preprocessing: predictions for raw Arrow or pandas input.

Classification: ``prediction`` (the class) and ``probabilities``; regression: ``prediction`` (the
value); clustering: ``prediction`` (the nearest centroid) and ``distances`` (squared).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn

from lepton_spark.serving import network_file
from lepton_spark.serving.preprocess import Columnar, Preprocessor
from lepton_spark.spec import FeatureSpec, InvalidPolicy

log = logging.getLogger(__name__)

SPEC_ARTIFACT = "feature_spec"  # the served model's artifacts (see lepton_spark.serving.pyfunc)
SPEC_FILE = "feature_spec.json"
WEIGHTS_ARTIFACT = "weights"  # the network without pickle (lepton_spark.serving.network_file)
NETWORK_ARTIFACT = "network"  # models logged before WEIGHTS_ARTIFACT: an mlflow.pytorch pickle


PREDICTION = "prediction"

PROBABILITIES = "probabilities"

DISTANCES = "distances"


def list_column(
    matrix: np.ndarray, dtype: type = np.float32, mask: np.ndarray | None = None
) -> pa.Array:
    """A ``[rows, width]`` matrix as an Arrow list column of ``dtype`` (``mask``: null rows)."""
    rows, width = matrix.shape
    flat = pa.array(matrix.reshape(-1).astype(dtype))
    offsets = pa.array(np.arange(0, width * rows + 1, width, np.int32))
    if mask is None or not mask.any():
        return pa.ListArray.from_arrays(offsets, flat)
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(mask))


@dataclass(frozen=True)
class Scored:
    """The network's outputs for the rows it scored, and which rows those are.

    ``scored`` is a bool per input row (``None``: every row); ``invalid`` counts the rows with an
    invalid value per column (what training would have refused, whatever the policy did)."""

    outputs: np.ndarray  # [scored rows, outputs]
    rows: int
    scored: np.ndarray | None
    invalid: dict[str, int]
    invalid_total: int  # rows with any invalid value
    policy: InvalidPolicy

    @property
    def invalid_rows(self) -> int:
        """Rows scored by no network output: the ones ``keep`` nulls and ``skip`` leaves out."""
        return 0 if self.scored is None else int(self.rows - self.scored.sum())

    def spread(self, values: np.ndarray) -> np.ndarray:
        """``values`` of the scored rows placed at their rows (zeros elsewhere), for ``keep``."""
        if self.scored is None or self.policy == "skip":
            return values
        out = np.zeros((self.rows, *values.shape[1:]), dtype=values.dtype)
        out[self.scored] = values
        return out

    @property
    def null_rows(self) -> np.ndarray | None:
        """Rows whose predictions are null (``keep``), or ``None``."""
        if self.scored is None or self.policy == "skip":
            return None
        return ~self.scored


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)


def invalid_summary(invalid: dict[str, int]) -> str:
    """``a: 3, img: 1``: the columns and their invalid rows."""
    return ", ".join(f"{c}: {n:,}" for c, n in invalid.items() if n)


POLICY_OUTCOME = {
    "keep": "their predictions are null",
    "skip": "they are left out",
    "fill": "their numbers are filled as in training (a broken array: null predictions)",
    "error": "scoring fails",
}


class Scorer:
    """A network and its preprocessing: predictions for raw Arrow or pandas input.

    Classification: ``prediction`` (the class) and ``probabilities``; regression: ``prediction``
    (the value); clustering: ``prediction`` (the nearest centroid) and ``distances`` (squared).

    A row training would have refused (:mod:`lepton_spark.serving.preprocess`) is handled by
    ``handle_invalid`` (Spark ML's ``handleInvalid``; default: the model's own policy,
    :attr:`FeatureSpec.invalid_policy`): ``error`` raises naming the columns and rows, ``skip``
    leaves the row out, ``keep`` keeps it with null predictions, ``fill`` fills its numbers as
    training did (a row with an invalid array is still kept with null predictions).
    """

    def __init__(
        self, spec: FeatureSpec, network: torch.nn.Module, handle_invalid: str | None = None
    ) -> None:
        self.spec = spec
        self.preprocess = Preprocessor(spec)
        self.network = network.eval()
        self.policy: InvalidPolicy = (
            spec.check_invalid_policy(handle_invalid) if handle_invalid else spec.invalid_policy
        )
        if spec.nulls is None and not handle_invalid:
            _say_once(
                "a model logged before lepton-spark 0.3 does not record how it was trained on "
                "missing values: it scores as it did, filling a null, NaN or infinite number with "
                f"{spec.fill_value} (handleInvalid 'keep', 'skip' or 'error' to do otherwise)"
            )

    def with_policy(self, handle_invalid: str | None) -> Scorer:
        """The same network under another ``handle_invalid`` (the default: this one's)."""
        if not handle_invalid or handle_invalid == self.policy:
            return self
        other = Scorer.__new__(Scorer)
        other.spec, other.preprocess, other.network = self.spec, self.preprocess, self.network
        other.policy = self.spec.check_invalid_policy(handle_invalid)
        return other

    def score(self, data: Columnar | pd.DataFrame) -> Scored:
        """The network's outputs for the rows the policy scores."""
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        prepared = self.preprocess.prepare(data)
        invalid = prepared.counts()
        if self.policy == "fill":  # numbers are filled; an array cannot be
            arrays = {a.name for a in self.spec.arrays}
            unscored = np.zeros(prepared.rows, dtype=bool)
            for name, mask in prepared.bad.items():
                if name in arrays:
                    unscored |= mask
        else:
            unscored = prepared.invalid
        if self.policy == "error" and unscored.any():
            raise ValueError(
                f"{int(unscored.sum()):,} of {prepared.rows:,} rows have invalid features "
                f"(null, NaN or infinite numbers, broken arrays; rows per column: "
                f"{invalid_summary(invalid)}) and handleInvalid is 'error' (keep or skip scores "
                "the rest)"
            )
        scored = None if not unscored.any() else ~unscored
        inputs = {
            k: torch.from_numpy(v if scored is None else v[scored])
            for k, v in prepared.inputs.items()
        }
        with torch.inference_mode():
            outputs = self.network(inputs).float().numpy()
        total = int(prepared.invalid.sum()) if invalid else 0
        return Scored(outputs, prepared.rows, scored, invalid, total, self.policy)

    def outputs(self, data: Columnar | pd.DataFrame) -> np.ndarray:
        """The network's raw outputs ``[rows, outputs]`` (of the rows the policy scores)."""
        return self.score(data).outputs

    def probabilities(self, data: Columnar | pd.DataFrame) -> np.ndarray:
        return _softmax(self.outputs(data))

    def predict(self, data: Columnar | pd.DataFrame) -> dict[str, np.ndarray]:
        """The predictions of the rows the policy scores (see :meth:`predictions`)."""
        return self.predictions(self.score(data))

    def predictions(self, scored: Scored) -> dict[str, np.ndarray]:
        outputs = scored.outputs
        task = self.spec.task
        if task == "classification":
            probabilities = _softmax(outputs)
            return {PREDICTION: probabilities.argmax(axis=1), PROBABILITIES: probabilities}
        if task == "regression":
            return {PREDICTION: outputs[:, 0].astype(np.float64)}
        return {PREDICTION: outputs.argmax(axis=1), DISTANCES: -outputs}

    def predict_spark_ml(self, scored: Scored) -> dict[str, np.ndarray]:
        """Predictions as Spark ML's models give them: ``raw``, ``probability`` and a double
        ``prediction`` for classification; a double ``prediction`` for regression; an integer
        cluster for k-means (of the rows scored).

        ``raw`` are the logits less their mean over the classes: the same softmax, and for two
        classes ``[-m, m]`` like Spark's logistic regression, so that its element 1 ranks the
        rows as the probability of class 1 does (what ``BinaryClassificationEvaluator`` reads).
        """
        outputs = scored.outputs.astype(np.float64)
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

    def predict_frame(
        self, data: Columnar | pd.DataFrame, index: pd.Index | None = None
    ) -> tuple[pd.DataFrame, Scored]:
        """The predictions as a frame (on ``index``, the input's rows: ``skip`` leaves some out;
        ``keep`` gives them nulls), and what was scored."""
        scored = self.score(data)
        nulls = scored.null_rows
        columns: dict[str, object] = {}
        for name, values in self.predictions(scored).items():
            full = scored.spread(values)
            if values.ndim > 1:
                rows = list(full)
                if nulls is not None:
                    rows = [None if n else r for r, n in zip(rows, nulls, strict=True)]
                columns[name] = rows
            elif nulls is None:
                columns[name] = full
            elif full.dtype.kind == "f":
                columns[name] = np.where(nulls, np.nan, full)
            else:
                columns[name] = pd.array(full, dtype="Int64")
                columns[name][nulls] = pd.NA
        if index is not None and scored.scored is not None and scored.policy == "skip":
            index = index[scored.scored]
        return pd.DataFrame(columns, index=index), scored

    def predict_arrow(
        self, batch: pa.RecordBatch, keys: list[str], source: pa.RecordBatch | None = None
    ) -> tuple[pa.RecordBatch, Scored]:
        """``keys`` columns as they are (of ``source``, default ``batch``), then the
        predictions of ``batch``; and what was scored."""
        scored = self.score(batch)
        nulls = scored.null_rows
        columns = []
        for values in self.predictions(scored).values():
            full = scored.spread(values)
            if full.ndim == 1:
                columns.append(pa.array(full, mask=nulls))
            else:
                columns.append(list_column(full, mask=nulls))
        keyed = kept_rows(batch if source is None else source, scored)
        return pa.RecordBatch.from_arrays(
            [*(keyed.column(name) for name in keys), *columns],
            names=[*keys, *self.predictions_names()],
        ), scored

    def predictions_names(self) -> list[str]:
        return [name for name, _ in output_columns(self.spec)]


def kept_rows(batch: pa.RecordBatch, scored: Scored) -> pa.RecordBatch:
    """``batch`` less the rows ``skip`` left out."""
    if scored.scored is None or scored.policy != "skip":
        return batch
    return batch.filter(pa.array(scored.scored))


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


def load_scorer(model_dir: str | Path, handle_invalid: str | None = None) -> Scorer:
    """A :class:`Scorer` from a downloaded model folder (what :func:`log_model` wrote)."""
    artifacts = Path(model_dir) / "artifacts"
    spec = FeatureSpec.model_validate_json((artifacts / SPEC_FILE).read_text())
    found = {p.name: str(p) for p in artifacts.iterdir()}
    spec = served_spec(found, spec)
    return Scorer(spec, load_network(found, spec), handle_invalid)


def served_spec(artifacts: Mapping[str, str], spec: FeatureSpec) -> FeatureSpec:
    """The spec as the served model uses it: a Hugging Face tokenizer read from the copy the
    model carries (``network/hf``), not from where it was at training."""
    if WEIGHTS_ARTIFACT not in artifacts or not any(t.tokenizer for t in spec.texts):
        return spec
    parts = network_file.hf_parts(Path(artifacts[WEIGHTS_ARTIFACT]))
    texts = [
        t.model_copy(update={"tokenizer": str(parts)}) if t.tokenizer else t for t in spec.texts
    ]
    return spec.model_copy(update={"texts": texts})


def load_network(artifacts: Mapping[str, str], spec: FeatureSpec) -> nn.Module:
    """The served model's network from its artifacts (name → local path): safetensors weights
    and an architecture record, or, in a model logged before those, an ``mlflow.pytorch`` pickle
    (which MLflow refuses to load under ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``)."""
    if WEIGHTS_ARTIFACT in artifacts:
        return network_file.load(Path(artifacts[WEIGHTS_ARTIFACT]), spec)
    import mlflow.pytorch

    return mlflow.pytorch.load_model(artifacts[NETWORK_ARTIFACT], map_location="cpu")
