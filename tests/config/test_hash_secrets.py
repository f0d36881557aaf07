"""The config hashes published as tags are computed over the redacted config: one cannot test
guesses of a secret against them."""

from __future__ import annotations

from lepton_spark.config import load_config
from tests.helpers import ROOT

DEMO = ROOT / "pipelines" / "tabular_demo.yaml"


def test_a_secret_does_not_enter_the_published_hashes():
    def with_secret(value: str):
        return load_config(DEMO, {"spark.conf.spark.hadoop.fs.s3a.secret.key": value})

    one, other = with_secret("guess-1"), with_secret("guess-2")
    assert one.fingerprint() == other.fingerprint()
    assert one.training_fingerprint() == other.training_fingerprint()
    # What is not a secret still counts.
    assert one.fingerprint() != load_config(DEMO, {"train.epochs": 7}).fingerprint()
