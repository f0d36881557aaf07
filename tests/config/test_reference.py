"""docs/config-reference.md is generated from the config's pydantic models and kept up to date."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel

from lepton_spark.config import schema
from tests.helpers import ROOT

SECTIONS = [
    cls
    for cls in vars(schema).values()
    if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == schema.__name__
]


def test_the_committed_reference_is_what_the_code_says():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("section", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_is_described(section):
    undescribed = [name for name, f in section.model_fields.items() if not f.description]
    assert not undescribed, f"{section.__name__}: no docstring for {undescribed}"


def test_the_reference_lists_every_field():
    page = (ROOT / "docs" / "config-reference.md").read_text()
    for field in ("train.num_workers", "shards.bytes_per_shard", "features.text[].min_count"):
        assert f"`{field}`" in page
