"""A folder the user pointed at that cannot be written is named (the field or option, the path)
with exit code 2, before anything is written and before any MLflow run is opened; the CLI
prints it without a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lepton_spark import run_pipeline
from lepton_spark.config import load_config
from lepton_spark.errors import EXIT_BAD_INPUT, PathError, exit_code
from lepton_spark.serving.output import check_destination
from lepton_spark.shards.storage import check_writable, locate
from tests.helpers import ROOT, run_cli, store_runs

DEMO = ROOT / "pipelines" / "tabular_demo.yaml"


@pytest.fixture()
def a_file(tmp_path):
    """A plain file where a folder would have to be."""
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("field", ["shards.root", "train.checkpoint_root", "tracking.local_store"])
def test_an_unusable_folder_is_named_before_any_run(tmp_path, a_file, field):
    overrides = {
        "shards.root": str(tmp_path / "shards"),
        "train.checkpoint_root": str(tmp_path / "checkpoints"),
        "tracking.local_store": str(tmp_path / "mlruns-data"),
    }
    overrides[field] = str(a_file / "inside")
    cfg = load_config(DEMO, overrides)
    with pytest.raises(PathError) as failed:
        run_pipeline(cfg, progress=lambda e: None)  # fails before a Spark session is made
    assert f"{field} {a_file / 'inside'}" in str(failed.value)
    assert "is not a folder" in str(failed.value) or "Not a directory" in str(failed.value)
    assert exit_code(failed.value) == EXIT_BAD_INPUT
    assert store_runs(tmp_path / "mlruns-data", cfg.name) == []
    assert not (tmp_path / "shards").exists() and not (tmp_path / "checkpoints").exists()


@pytest.fixture(params=["proc", "under-a-file", "read-only"])
def unmakeable(request, tmp_path, a_file) -> Path:
    """A folder that cannot be made, though no permission says so to root: one in ``/proc``, one
    under a plain file, one in a folder without write permission."""
    if request.param == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        return Path("/proc/nope")
    if request.param == "under-a-file":
        return a_file / "inside" / "deeper"
    if os.geteuid() == 0:
        pytest.skip("root writes in a folder without write permission")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked / "shards"


@pytest.mark.parametrize("field", ["shards.root", "train.checkpoint_root", "tracking.local_store"])
def test_a_folder_that_cannot_be_made_is_named_before_any_run(tmp_path, unmakeable, field):
    overrides = {
        "shards.root": str(tmp_path / "shards"),
        "train.checkpoint_root": str(tmp_path / "checkpoints"),
        "tracking.local_store": str(tmp_path / "mlruns-data"),
    }
    overrides[field] = str(unmakeable)
    cfg = load_config(DEMO, overrides)
    with pytest.raises(PathError) as failed:
        run_pipeline(cfg, progress=lambda e: None)  # fails before a Spark session is made
    assert str(failed.value).startswith(f"{field} {unmakeable} cannot be ")
    assert exit_code(failed.value) == EXIT_BAD_INPUT
    assert store_runs(tmp_path / "mlruns-data", cfg.name) == []
    assert not (tmp_path / "shards").exists() and not (tmp_path / "checkpoints").exists()


def test_a_folder_that_can_be_made_is_tried_and_nothing_is_left(tmp_path):
    check_writable(tmp_path / "a" / "b" / "c", "shards.root")  # made, probed, removed again
    check_writable(tmp_path, "shards.root")
    assert list(tmp_path.iterdir()) == []


def test_the_scoring_output_is_checked_before_scoring(a_file):
    with pytest.raises(PathError, match=r"--output .*notes.txt/scored cannot be made"):
        check_destination(locate(a_file / "scored"), overwrite=False)


def test_the_cli_names_the_field_without_a_traceback(tmp_path, a_file):
    proc = run_cli(
        "run",
        str(DEMO),
        "--set",
        f"shards.root={a_file / 'shards'}",
        f"tracking.local_store={tmp_path / 'mlruns-data'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "shards.root" in proc.stderr and "notes.txt" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_the_cli_names_a_folder_in_proc_before_spark_starts(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    proc = run_cli(
        "run",
        str(DEMO),
        "--set",
        "shards.root=/proc/nope",
        f"tracking.local_store={tmp_path / 'mlruns-data'}",
        cwd=tmp_path,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_BAD_INPUT, out[-2000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: shards.root /proc/nope cannot be made")
    assert "Traceback" not in out and "log4j" not in out  # no JVM was started
