"""The served model: raw input columns in, prediction and class probabilities out.

The network a rank trains sees preprocessed features (vocabulary indices, standardised numbers).
The model logged to MLflow carries that preprocessing with it (the :class:`FeatureSpec`), so
``mlflow.pyfunc.load_model(uri).predict(frame)`` takes the columns the pipeline's SQL transform
produces, as they are: strings (or any type) for categorical columns, numbers for numeric ones.
What ETL does on Spark is done here with Arrow compute, the same way:

- a categorical value is matched as Spark casts it to a string (``3`` → ``"3"``, ``True`` →
  ``"true"``); a value not in the vocabulary, or null, is the "unknown" index 0;
- a null, NaN or infinite number becomes the spec's ``fill_value``, then it is standardised with
  the training statistics (when ``features.standardize`` was on).

The trained ``nn.Module`` is inside, as an ``mlflow.pytorch`` model (artifact ``network``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from mlflow.pyfunc import PythonModel

from lepton_spark.spec import (
    FIRST_WORD,
    PAD_TOKEN,
    TOKEN_SPLIT,
    UNKNOWN_INDEX,
    UNKNOWN_TOKEN,
    FeatureSpec,
)

PREDICTION = "prediction"
PROBABILITIES = "probabilities"
DISTANCES = "distances"
SPEC_ARTIFACT = "feature_spec"
NETWORK_ARTIFACT = "network"

Columnar = pa.Table | pa.RecordBatch


class Preprocessor:
    """Raw columns → the model's input arrays (:mod:`lepton_spark.spec`), as ETL prepares them."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._vocabularies = [pa.array(c.vocabulary, pa.string()) for c in spec.categorical]
        self._word_ids = [
            {w: i + FIRST_WORD for i, w in enumerate(t.vocabulary)} for t in spec.texts
        ]

    def missing_columns(self, columns: list[str]) -> list[str]:
        return [c for c in self.spec.input_columns if c not in columns]

    def __call__(self, data: Columnar) -> dict[str, np.ndarray]:
        spec = self.spec
        missing = self.missing_columns(data.schema.names)
        if missing:
            raise ValueError(
                f"input lacks the model's columns {missing} (it has {data.schema.names}); "
                f"the model reads {spec.input_columns}"
            )
        rows = data.num_rows
        numeric = np.empty((rows, len(spec.numeric)), dtype=np.float32)
        for i, name in enumerate(spec.numeric):
            values = np.asarray(
                pc.cast(data.column(name), pa.float64()).to_numpy(zero_copy_only=False),
                dtype=np.float64,
            ).copy()
            values[~np.isfinite(values)] = spec.fill_value
            scale = spec.standardize.get(name)
            if scale is not None:
                values = (values - scale.mean) / scale.std
            numeric[:, i] = values
        categorical = np.empty((rows, len(spec.categorical)), dtype=np.int64)
        for i, (feature, vocabulary) in enumerate(
            zip(spec.categorical, self._vocabularies, strict=True)
        ):
            column = data.column(feature.name)
            if column.type != pa.string():
                column = pc.cast(column, pa.string())
            index = pc.index_in(column, value_set=vocabulary)  # null: not in the vocabulary
            categorical[:, i] = (
                pc.fill_null(index, UNKNOWN_INDEX - 1).to_numpy(zero_copy_only=False) + 1
            )
        out = {"numeric": numeric, "categorical": categorical}
        for a in spec.arrays:
            out[a.name] = _fixed_array(data.column(a.name), a.name, a.length).reshape(
                rows, *a.shape
            )
        for t, ids in zip(spec.texts, self._word_ids, strict=True):
            out[t.name] = token_ids(data.column(t.name).to_pylist(), ids, t.max_length)
        return out


def _fixed_array(column: Any, name: str, length: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"array column {name!r} has {column.null_count} null rows")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != length or lengths.max() != length):
        raise ValueError(
            f"array column {name!r} has rows of {lengths.min()}..{lengths.max()} values; the "
            f"model takes {length}"
        )
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(column), length)


def tokens(text: str | None) -> list[str]:
    """Lower case, split on anything but letters and digits: what ETL does on Spark."""
    return [t for t in re.split(TOKEN_SPLIT, (text or "").lower()) if t]


def token_ids(texts: list[str | None], ids: dict[str, int], length: int) -> np.ndarray:
    out = np.full((len(texts), length), PAD_TOKEN, dtype=np.int64)
    for row, text in enumerate(texts):
        words = tokens(text)[:length]
        out[row, : len(words)] = [ids.get(w, UNKNOWN_TOKEN) for w in words]
    return out


def _list_column(matrix: np.ndarray) -> pa.Array:
    rows, width = matrix.shape
    flat = pa.array(matrix.reshape(-1).astype(np.float32))
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

    def predict_frame(self, data: Columnar | pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {k: v if v.ndim == 1 else list(v) for k, v in self.predict(data).items()}
        )

    def predict_arrow(self, batch: pa.RecordBatch, keys: list[str]) -> pa.RecordBatch:
        """``keys`` columns of ``batch`` as they are, then the predictions."""
        predicted = self.predict(batch)
        columns = [pa.array(v) if v.ndim == 1 else _list_column(v) for v in predicted.values()]
        return pa.RecordBatch.from_arrays(
            [*(batch.column(name) for name in keys), *columns],
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


class TabularModel(PythonModel):
    """The pyfunc model MLflow stores: see the module's docstring."""

    def load_context(self, context: Any) -> None:
        import mlflow.pytorch

        spec = FeatureSpec.model_validate_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        network = mlflow.pytorch.load_model(context.artifacts[NETWORK_ARTIFACT], map_location="cpu")
        self.scorer = Scorer(spec, network)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return self.scorer.predict_frame(model_input)


def log_model(
    network: torch.nn.Module,
    spec: FeatureSpec,
    raw_example: pd.DataFrame,
    pip_requirements: list[str],
    name: str = "model",
) -> str:
    """Log ``network`` with its preprocessing as a pyfunc model into the active run; its URI.

    The package's own code travels with the model (``code_paths``), so it loads where
    lepton-spark is not installed; a user's model class must be importable where it is loaded.
    """
    import mlflow
    import mlflow.pytorch

    scorer = Scorer(spec, network)
    example_output = scorer.predict_frame(raw_example)
    with tempfile.TemporaryDirectory(prefix="lepton-model-") as tmp, _quiet_mlflow():
        signature = _signature(spec, raw_example, example_output)
        spec_file = Path(tmp) / "feature_spec.json"
        spec_file.write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        network_dir = Path(tmp) / "network"
        mlflow.pytorch.save_model(
            network,
            str(network_dir),
            serialization_format="pickle",
            pip_requirements=pip_requirements,
        )
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=TabularModel(),
            artifacts={SPEC_ARTIFACT: str(spec_file), NETWORK_ARTIFACT: str(network_dir)},
            code_paths=[str(_package_folder(Path(tmp)))],
            signature=signature,
            input_example=raw_example,
            pip_requirements=pip_requirements,
        )
    return info.model_uri


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """The pickle formats are chosen on purpose (the network is a plain module, the preprocessing
    a Python class); mlflow warns about them, and about int columns in the output, every time."""
    loggers = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.pyfunc", "mlflow.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
            # Pickling a quantized module touches torch's deprecated TypedStorage.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _signature(spec: FeatureSpec, example: pd.DataFrame, output: pd.DataFrame) -> Any:
    """Inputs as the example has them, but numbers as doubles and every column optional: a
    missing number is filled and a missing category is "unknown", so MLflow must let them in."""
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    example = example.copy()
    for name in spec.numeric:
        example[name] = example[name].astype("float64")
    for name in spec.categorical_names:  # integer codes: NaN must fit (3.0 is matched as "3")
        if pd.api.types.is_integer_dtype(example[name]):
            example[name] = example[name].astype("float64")
    signature = infer_signature(example, output)
    signature.inputs = Schema(
        [ColSpec(c.type, c.name, required=False) for c in signature.inputs.inputs]
    )
    return signature


def _package_folder(scratch: Path) -> Path:
    """lepton_spark's source folder for ``code_paths``; extracted when it was imported from a
    zip (spark-submit's ``--py-files``)."""
    here = Path(__file__).parent
    if here.is_dir():
        return here
    archive = next(p for p in here.parents if p.suffix == ".zip")
    inside = here.relative_to(archive).as_posix()
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.namelist() if m.startswith(inside + "/")]
        zipped.extractall(scratch / "code", members)
    return scratch / "code" / inside


def load_scorer(model_dir: str | Path) -> Scorer:
    """A :class:`Scorer` from a downloaded model folder (what :func:`log_model` wrote)."""
    import mlflow.pytorch

    root = Path(model_dir)
    artifacts = root / "artifacts"
    spec = FeatureSpec.model_validate_json((artifacts / "feature_spec.json").read_text())
    network = mlflow.pytorch.load_model(str(artifacts / "network"), map_location="cpu")
    return Scorer(spec, network)


def decode(
    spec: FeatureSpec,
    numeric: np.ndarray,
    categorical: np.ndarray,
    extras: tuple[np.ndarray, ...] = (),
) -> pd.DataFrame:
    """Preprocessed features back to raw columns (vocabulary values, unstandardised numbers,
    arrays as lists, token ids as words): shard rows as the model's raw input, for checks and
    notebooks. Categorical index 0 becomes ``None``; an unknown word is left out of the text."""
    frame: dict[str, Any] = {}
    for i, name in enumerate(spec.numeric):
        scale = spec.standardize.get(name)
        values = numeric[:, i].astype(np.float64)
        frame[name] = values * scale.std + scale.mean if scale else values
    for i, feature in enumerate(spec.categorical):
        lookup = np.array([None, *feature.vocabulary], dtype=object)
        frame[feature.name] = lookup[categorical[:, i]]
    rest = iter(extras)
    for a in spec.arrays:
        frame[a.name] = list(next(rest).astype(np.float64))
    for t in spec.texts:
        words = np.array(["", "", *t.vocabulary], dtype=object)
        frame[t.name] = [" ".join(w for w in words[row] if w) for row in next(rest)]
    return pd.DataFrame(frame)


def shard_rows(folder: str, split: str = "validation") -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """A split's shards as (raw input frame, labels) per record batch."""
    from lepton_spark.loader import Layout, record_batches
    from lepton_spark.manifest import read_manifest
    from lepton_spark.storage import locate

    manifest = read_manifest(folder)
    spec = manifest.feature_spec
    layout = Layout.of(spec)
    for shard in manifest.split(split).shards:
        for batch in record_batches(locate(folder).child(shard.path), layout):
            raw = decode(
                spec,
                batch.numeric.numpy(),
                batch.categorical.numpy(),
                tuple(t.numpy() for t in batch.extras),
            )
            yield raw, batch.label.numpy()
