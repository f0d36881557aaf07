"""The model MLflow stores: raw input columns in, prediction and class probabilities out.

The network a rank trains sees preprocessed features (vocabulary indices, standardised numbers).
The logged pyfunc model carries that preprocessing with it (the :class:`FeatureSpec`, artifact
``feature_spec``), so ``mlflow.pyfunc.load_model(uri).predict(frame)`` takes the columns the
pipeline's SQL transform produces, as they are (:mod:`lepton_spark.serving.preprocess`). The
trained network is inside as weights and an architecture record (artifact ``weights``,
:mod:`lepton_spark.serving.network_file`), lepton-spark's code travels with it (``code_paths``)
and the pyfunc model itself is built by :mod:`lepton_spark.serving.model_code` ("models from
code"): no pickle anywhere, so it loads with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Models logged earlier are pickles (the pyfunc model, and the network as an ``mlflow.pytorch`` model,
artifact ``network``); they still load where pickles are allowed. Those logged before 0.2 name this
class ``lepton_spark.serving.TabularModel``: :mod:`lepton_spark.serving` still answers to that name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import logging
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from lepton_spark.config.schema import ModelConfig
from lepton_spark.serving import network_file
from lepton_spark.serving.scorer import (
    POLICY_OUTCOME,
    SPEC_ARTIFACT,
    SPEC_FILE,
    WEIGHTS_ARTIFACT,
    Scorer,
    invalid_summary,
    load_network,
    served_spec,
)
from lepton_spark.spec import FeatureSpec

log = logging.getLogger(__name__)

MODEL_CODE = "model_code.py"  # in this package; read as a resource (it may be inside a zip)
HANDLE_INVALID = "handleInvalid"  # the pyfunc model's param (Spark ML's name)


class TabularModel(PythonModel):
    """The pyfunc model MLflow stores: see the module's docstring."""

    def load_context(self, context: Any) -> None:
        spec = FeatureSpec.model_validate_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        spec = served_spec(context.artifacts, spec)
        self.scorer = Scorer(spec, load_network(context.artifacts, spec))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        """Predictions on the input's index. ``params={"handleInvalid": ...}``: what becomes of a
        row training would have refused (``keep``: null predictions, ``skip``: left out,
        ``error``; the default is the model's own, see ``docs/model-lifecycle.md``)."""
        policy = (params or {}).get(HANDLE_INVALID) or None
        index = model_input.index if isinstance(model_input, pd.DataFrame) else None
        frame, scored = self.scorer.with_policy(policy).predict_frame(model_input, index)
        if scored.invalid_total:
            log.warning(
                "%s of %s rows have invalid features (%s): %s (handleInvalid=%r)",
                f"{scored.invalid_total:,}",
                f"{scored.rows:,}",
                invalid_summary(scored.invalid),
                POLICY_OUTCOME[scored.policy],
                scored.policy,
            )
        return frame


def log_model(
    network: torch.nn.Module,
    model: ModelConfig,
    spec: FeatureSpec,
    raw_example: pd.DataFrame,
    pip_requirements: list[str],
    name: str = "model",
) -> str:
    """Log ``network`` (built from ``model``, maybe compressed) with its preprocessing as a pyfunc
    model into the active run; its URI.

    The package's own code travels with the model (``code_paths``), so it loads where
    lepton-spark is not installed; a user's model factory must be importable where it is loaded.
    """
    import mlflow

    scorer = Scorer(spec, network)
    example_output, _ = scorer.predict_frame(raw_example)
    with tempfile.TemporaryDirectory(prefix="lepton-model-") as tmp, _quiet_mlflow():
        signature = _signature(spec, raw_example, example_output)
        spec_file = Path(tmp) / SPEC_FILE
        spec_file.write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        # spark-submit --py-files ships the package as a zip: the file MLflow runs is written
        # out from the package's resources, not pointed at.
        code = Path(tmp) / MODEL_CODE
        code.write_text(resources.files("lepton_spark.serving").joinpath(MODEL_CODE).read_text())
        weights_dir = Path(tmp) / WEIGHTS_ARTIFACT
        network_file.save(network, model, weights_dir)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={SPEC_ARTIFACT: str(spec_file), WEIGHTS_ARTIFACT: str(weights_dir)},
            code_paths=[str(_package_folder(Path(tmp)))],
            signature=signature,
            input_example=raw_example,
            pip_requirements=pip_requirements,
        )
    return info.model_uri


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """mlflow warns about int columns in the output (they cannot hold a missing value; ours never
    miss one) every time."""
    loggers = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.pyfunc", "mlflow.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _signature(spec: FeatureSpec, example: pd.DataFrame, output: pd.DataFrame) -> Any:
    """Inputs as the example has them, but numbers as doubles and every column optional: a
    missing number is the model's handleInvalid to handle (a null prediction, filled, left out or
    an error) and a missing category is "unknown", so MLflow must let them in."""
    from mlflow.models import infer_signature
    from mlflow.types import ColSpec, Schema

    example = example.copy()
    for name in spec.numeric:
        example[name] = example[name].astype("float64")
    for name in spec.categorical_names:  # integer codes: NaN must fit (3.0 is matched as "3")
        if pd.api.types.is_integer_dtype(example[name]):
            example[name] = example[name].astype("float64")
    signature = infer_signature(example, output, params={HANDLE_INVALID: spec.invalid_policy})
    signature.inputs = Schema(
        [ColSpec(c.type, c.name, required=False) for c in signature.inputs.inputs]
    )
    return signature


def _package_folder(scratch: Path) -> Path:
    """lepton_spark's source folder for ``code_paths``; extracted when it was imported from a
    zip (spark-submit's ``--py-files``)."""
    here = Path(__file__).parents[1]  # lepton_spark/, not lepton_spark/serving/
    if here.is_dir():
        return here
    archive = next(p for p in here.parents if p.suffix == ".zip")
    inside = here.relative_to(archive).as_posix()
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.namelist() if m.startswith(inside + "/")]
        zipped.extractall(scratch / "code", members)
    return scratch / "code" / inside


def pip_requirements(model: ModelConfig | None = None) -> list[str]:
    """What loads a served model; lepton-spark itself travels inside it (``code_paths``).
    A Hugging Face model (``hf``) needs transformers and tokenizers too."""
    hf = (
        [f"transformers=={md.version('transformers')}", f"tokenizers=={md.version('tokenizers')}"]
        if model is not None and model.name == "hf"
        else []
    )
    return [
        *hf,
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pyarrow=={md.version('pyarrow')}",
        f"pydantic=={md.version('pydantic')}",
        f"safetensors=={md.version('safetensors')}",
        f"mlflow=={md.version('mlflow')}",
    ]


TRANSFORMERS_NAME = "transformers"  # the run's second logged model of an ``hf`` network


def log_transformers_model(network: torch.nn.Module, name: str = TRANSFORMERS_NAME) -> str:
    """The fine-tuned Hugging Face model and its tokenizer as MLflow's ``transformers`` flavor
    (a ``text-classification`` pipeline) into the active run, beside our pyfunc: loadable with
    ``mlflow.transformers.load_model`` by tools that speak Hugging Face. Its labels are
    ``LABEL_<class index>``. Its URI. The requirements are given (what the model needs: torch,
    transformers, tokenizers), not inferred: MLflow's inference imports torchvision, which a
    text model does not need."""
    import mlflow
    from transformers import pipeline

    from lepton_spark import hf

    tokenizer = hf.load_tokenizer(network.pretrained)  # type: ignore[arg-type]
    classifier = pipeline(
        "text-classification", model=network.net, tokenizer=tokenizer, device="cpu"
    )
    with _quiet_mlflow():
        info = mlflow.transformers.log_model(
            transformers_model=classifier,
            name=name,
            task="text-classification",
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={md.version('transformers')}",
                f"tokenizers=={md.version('tokenizers')}",
                f"safetensors=={md.version('safetensors')}",
            ],
        )
    return info.model_uri
