"""The served model's preprocessing: raw columns → model inputs exactly as ETL made them."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from lepton_spark.config import ModelConfig
from lepton_spark.models import build_model
from lepton_spark.serving.preprocess import Preprocessor, decode, tokens
from lepton_spark.serving.scorer import Scorer
from lepton_spark.spec import (
    ArrayFeature,
    CategoricalFeature,
    FeatureSpec,
    Standardization,
    TextFeature,
)

SPEC = FeatureSpec(
    numeric=["a", "b"],
    categorical=[CategoricalFeature(name="c", vocabulary=["x", "y"])],
    label="y",
    num_classes=3,
    standardize={"a": Standardization(mean=1.0, std=2.0)},
    fill_value=-5.0,
)


IMAGE_TEXT = FeatureSpec(
    numeric=[],
    categorical=[],
    label="y",
    num_classes=4,
    arrays=[ArrayFeature(name="img", shape=[1, 4, 4])],
    texts=[TextFeature(name="doc", vocabulary=["good", "bad", "film"], max_length=5)],
)


def test_preprocessing_indexes_standardises_and_fills_like_etl():
    frame = pd.DataFrame(
        {
            "a": [3.0, np.nan, np.inf, 1.0],
            "b": [1, 2, 3, 4],  # integers are numbers too
            "c": ["y", "x", "never seen", None],
            "extra": ["kept out", "of", "the", "model"],
        }
    )
    prepared = Preprocessor(SPEC)(pa.Table.from_pandas(frame))
    numeric, categorical = prepared["numeric"], prepared["categorical"]
    # a: (3 - 1) / 2 = 1; NaN and inf are filled with -5, then standardised: (-5 - 1) / 2 = -3.
    np.testing.assert_allclose(numeric[:, 0], [1.0, -3.0, -3.0, 0.0])
    np.testing.assert_allclose(numeric[:, 1], [1.0, 2.0, 3.0, 4.0])
    assert numeric.dtype == np.float32
    # Vocabulary index + 1; unseen values and nulls are the unknown index 0.
    assert categorical[:, 0].tolist() == [2, 1, 0, 0]


def test_categorical_values_match_as_spark_casts_them_to_strings():
    spec = SPEC.model_copy(
        update={"categorical": [CategoricalFeature(name="c", vocabulary=["7", "true"])]}
    )
    table = pa.table({"a": [0.0, 0.0], "b": [0.0, 0.0], "c": [7, 8]})
    assert Preprocessor(spec)(table)["categorical"][:, 0].tolist() == [1, 0]
    table = pa.table({"a": [0.0, 0.0], "b": [0.0, 0.0], "c": [True, False]})
    assert Preprocessor(spec)(table)["categorical"][:, 0].tolist() == [2, 0]


def test_missing_columns_are_named():
    try:
        Preprocessor(SPEC)(pa.table({"a": [1.0]}))
    except ValueError as err:
        assert "['b', 'c']" in str(err)
    else:
        raise AssertionError("no error for missing columns")


def test_scorer_probabilities_equal_the_network_on_preprocessed_features():
    network = build_model(ModelConfig(hidden=[8]), SPEC, seed=0).eval()
    scorer = Scorer(SPEC, network)
    frame = pd.DataFrame({"a": [3.0, -1.0], "b": [0.5, 0.25], "c": ["x", "zz"]})
    expected = torch.softmax(
        network(
            {
                "numeric": torch.tensor([[1.0, 0.5], [-1.0, 0.25]]),
                "categorical": torch.tensor([[1], [0]]),
            }
        ),
        dim=1,
    )
    np.testing.assert_allclose(scorer.probabilities(frame), expected.detach().numpy(), rtol=1e-6)

    batch = pa.RecordBatch.from_pandas(frame.assign(id=[10, 11]), preserve_index=False)
    out, scored = scorer.predict_arrow(batch, keys=["id"])
    assert scored.invalid_total == 0 and scored.scored is None
    assert out.schema.names == ["id", "prediction", "probabilities"]
    assert out.column("id").to_pylist() == [10, 11]
    assert out.column("prediction").to_pylist() == expected.argmax(dim=1).tolist()
    np.testing.assert_allclose(
        np.array(out.column("probabilities").to_pylist()), expected.detach().numpy(), rtol=1e-6
    )


def test_decode_inverts_the_preprocessing():
    raw = pd.DataFrame({"a": [3.0, -1.0], "b": [0.5, 0.25], "c": ["x", None]})
    prepared = Preprocessor(SPEC)(pa.Table.from_pandas(raw))
    back = decode(SPEC, prepared["numeric"], prepared["categorical"])
    np.testing.assert_allclose(back[["a", "b"]].to_numpy(), raw[["a", "b"]].to_numpy())
    assert back["c"].tolist() == ["x", None]


def test_arrays_and_text_are_shaped_and_tokenised_like_etl():
    table = pa.table(
        {
            "img": [[float(i) for i in range(16)], [0.5] * 16],
            "doc": ["A GOOD film, good!", None],
        }
    )
    prepared = Preprocessor(IMAGE_TEXT)(table)
    assert prepared["img"].shape == (2, 1, 4, 4) and prepared["img"].dtype == np.float32
    assert prepared["img"][0, 0, 3, 3] == 15.0
    # "a" is not in the vocabulary (1); good=2, bad=3, film=4; 0 pads.
    assert prepared["doc"].tolist() == [[1, 2, 4, 2, 0], [0, 0, 0, 0, 0]]
    assert tokens("Hello,World  2x") == ["hello", "world", "2x"]
    with pytest.raises(ValueError, match=r"'img' has 1 rows .* the model's 16 values"):
        Preprocessor(IMAGE_TEXT)(pa.table({"img": [[1.0, 2.0, 3.0]], "doc": ["x"]}))
