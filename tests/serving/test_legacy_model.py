"""A model logged by lepton-spark 0.1.0 (the flat layout) still loads and predicts the same."""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.helpers import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "legacy_model"


def test_a_model_logged_before_the_restructuring_loads_and_predicts_the_same(caplog, monkeypatch):
    from lepton_spark.serving import scorer

    monkeypatch.setattr(scorer, "_SAID", set())
    with caplog.at_level(logging.WARNING, logger="lepton_spark.serving.scorer"):
        model = mlflow.pyfunc.load_model(str(FIXTURE))
        mlflow.pyfunc.load_model(str(FIXTURE))
    said = [r.getMessage() for r in caplog.records if "before lepton-spark 0.3" in r.getMessage()]
    assert len(said) == 1, said  # once per process: it scores as it did, filling
    example = pd.DataFrame(
        {
            "x0": [0.1, 1.5, -2.0, None],
            "x1": [1.0, 0.0, 3.0, 2.0],
            "cat": ["a", "c", "zz", None],
        }
    )
    out = model.predict(example)
    expected = json.loads((FIXTURE / "expected_predictions.json").read_text())
    assert out["prediction"].tolist() == expected["prediction"]
    np.testing.assert_allclose(
        np.stack(out["probabilities"].to_numpy()), np.array(expected["probabilities"]), rtol=1e-6
    )
    # Told otherwise, it keeps the row with the missing number unscored (its signature has no
    # params, so MLflow drops them: `score --invalid`, TorchModel and the python model take it).
    kept = model.unwrap_python_model().predict(None, example, params={"handleInvalid": "keep"})
    assert kept["prediction"].isna().tolist() == [False, False, False, True]
    # It was unpickled through the old import paths, into today's classes.
    python_model = model.unwrap_python_model()
    assert type(python_model).__module__ == "lepton_spark.serving.pyfunc"
    assert type(python_model.scorer.network).__module__ == "lepton_spark.models"


def test_the_old_import_paths_are_the_new_classes():
    from lepton_spark import serving
    from lepton_spark.models import TabularMLP
    from lepton_spark.serving.pyfunc import TabularModel

    assert serving.TabularModel is TabularModel
    assert TabularMLP.__module__ == "lepton_spark.models"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = serving.Nope
