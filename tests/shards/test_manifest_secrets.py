"""A manifest on disk keeps no secret of the source it describes, and only its owner reads it."""

from __future__ import annotations

import stat

from lepton_spark.redact import REDACTED
from lepton_spark.shards.commit import make_manifest
from lepton_spark.shards.manifest import MANIFEST_NAME, read_manifest, write_manifest
from lepton_spark.spec import FeatureSpec


def test_the_manifest_is_redacted_and_written_for_its_owner_only(tmp_path):
    secret = "s3cr3t-value-that-must-not-be-on-disk"
    source = {
        "events": {
            "path": f"s3://bucket/events?secret_key={secret}&region=eu",
            "options": {"password": secret, "header": "true"},
            "jdbc": f"postgresql://analyst:{secret}@db:5432/sales",
        }
    }
    spec = FeatureSpec(numeric=["x"], categorical=[], label="y", num_classes=2)
    manifest = make_manifest("f" * 64, spec, {}, source=source)
    write_manifest(tmp_path, manifest)

    on_disk = (tmp_path / MANIFEST_NAME).read_text()
    assert secret not in on_disk
    events = read_manifest(tmp_path).source["events"]
    assert events["options"] == {"password": REDACTED, "header": "true"}
    assert "region=eu" in events["path"] and REDACTED in events["jdbc"]
    assert stat.S_IMODE((tmp_path / MANIFEST_NAME).stat().st_mode) == 0o600
