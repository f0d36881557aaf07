import torch

from lepton_spark.config import ModelConfig
from lepton_spark.models import ExportedClassifier, build_model
from lepton_spark.spec import CategoricalFeature, FeatureSpec

SPEC = FeatureSpec(
    numeric=["a", "b"],
    categorical=[CategoricalFeature(name="c", vocabulary=["x", "y"])],
    label="y",
    num_classes=3,
)


def test_exported_model_takes_one_matrix_and_returns_probabilities():
    model = build_model(ModelConfig(hidden=[8]), SPEC, seed=0).eval()
    exported = ExportedClassifier(model, n_numeric=2, cardinalities=[3]).eval()
    inputs = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, 1.0]])
    probs = exported(inputs)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    expected = torch.softmax(model(inputs[:, :2], torch.tensor([[2], [1]])), dim=1)
    torch.testing.assert_close(probs, expected)


def test_categorical_indices_the_vocabulary_lacks_count_as_unknown():
    model = build_model(ModelConfig(hidden=[8]), SPEC, seed=0).eval()
    exported = ExportedClassifier(model, n_numeric=2, cardinalities=[3]).eval()
    unknown = exported(torch.tensor([[0.1, 0.2, 0.0]]))
    for bad in (3.0, 17.0, -1.0):
        torch.testing.assert_close(exported(torch.tensor([[0.1, 0.2, bad]])), unknown)
