"""The notebooks in ``notebooks/`` run as a user runs them, and are kept without outputs.

Each notebook is executed cell by cell in a Jupyter kernel started from this interpreter (a kernel
spec written for the test, so whatever other kernels the machine has, the kernel is this
environment's Python), with ``notebooks/`` as its working directory and ``LEPTON_NOTEBOOK_WORK``
pointing at the test's temporary folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "lepton-spark-tests"
# Appended to the executed copy only: which interpreter the kernel really ran.
WHICH_PYTHON = "import sys\nprint(sys.executable, end='')"


def notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_there_are_notebooks_to_run():
    assert (NOTEBOOKS / "quickstart.ipynb") in notebooks()


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts; clear them before "
        "committing (Jupyter: Edit > Clear Outputs of All Cells, then save)"
    )


def this_interpreters_kernel(home: Path) -> str:
    """A kernel spec for ``sys.executable`` under ``home`` (to go first on ``JUPYTER_PATH``)."""
    spec = home / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lepton-spark (tests)",
                "language": "python",
            }
        )
    )
    return KERNEL


def files_under(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if ".ipynb_checkpoints" not in p.parts}


@pytest.mark.slow
@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_runs_from_top_to_bottom(
    path: Path, tmp_path: Path, monkeypatch, horovod, starts_spark
):
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("LEPTON_NOTEBOOK_WORK", str(work))
    before = files_under(NOTEBOOKS)

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(WHICH_PYTHON))
    client = NotebookClient(
        nb,
        kernel_name=this_interpreters_kernel(jupyter),
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    ran = nb.cells[-1].outputs
    assert [o.get("text") for o in ran] == [sys.executable]
    assert files_under(NOTEBOOKS) == before, "the notebook wrote into the repository"
    assert any(work.iterdir()), "the notebook wrote nothing under LEPTON_NOTEBOOK_WORK"
