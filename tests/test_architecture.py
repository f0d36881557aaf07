"""The architecture as docs/architecture.md draws it, held by tests.

- The rank side (``training/`` and the shard loader) imports neither Spark nor MLflow: checked in
  a fresh interpreter, by what lands in ``sys.modules``.
- Each room imports only the rooms the design allows (read from every ``import`` statement,
  function-level ones included).
- Importing lepton-spark changes nothing global: the warning filters and matplotlib's backend
  are as they were.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "lepton_spark"

# room → the rooms it may import (``foundation`` is everyone's). The same table is in
# docs/architecture.md, "The rooms and what each may import".
FOUNDATION = {
    "errors",
    "names",
    "events",
    "spec",
    "redact",
    "config",
    "sparkinfo",
    "storewire",
    "__version__",
}
ALLOWED: dict[str, set[str]] = {
    "front door": {"pipeline", "ml"},  # lepton_spark/__init__.py: lazily
    "shards front door": {"distributed"},  # lepton_spark/shards/__init__.py: materialize, lazily
    "foundation": set(),
    "models": {"hf"},
    "hf": {"shards"},  # Hugging Face: tokenizers on the executors, pretrained folders
    "shards": set(),
    "training": {"shards", "models"},
    "data": {"shards", "hf"},
    "cluster": set(),
    "tracking": {"shards"},
    "serving": {"shards", "data", "models", "hf"},
    "baselines": set(),
    "pipeline": {
        "data",
        "shards",
        "training",
        "cluster",
        "tracking",
        "serving",
        "models",
        "baselines",
    },
    "ml": {"pipeline", "serving", "data", "tracking"},
    "cli": {"pipeline", "cluster", "tracking", "serving", "data", "shards"},
    # run(fn): the stage and MLflow at the driver; the engines, loader and models on the ranks;
    # materialize: the pipeline's shard step on a DataFrame (the estimator's view of it).
    "distributed": {"cluster", "training", "shards", "tracking", "pipeline", "data", "ml"},
}
# Rooms that must never import these third-party packages.
FORBIDDEN = {
    "training": {"pyspark", "mlflow"},
    "shards": {"mlflow"},
    "models": {"pyspark", "mlflow"},
    "hf": {"pyspark", "mlflow", "torch"},
    "cluster": {"mlflow"},
    "distributed": {"horovod"},  # the engines import it, on the ranks that use it
    "ml": {"horovod"},
    "tracking": {"pyspark"},
    "foundation": {"pyspark", "mlflow", "torch"},
}


def room_of(path: Path) -> str:
    top = path.relative_to(PACKAGE).with_suffix("").parts[0]
    if top == "__init__":
        return "front door"
    if path.relative_to(PACKAGE).as_posix() == "shards/__init__.py":
        return "shards front door"
    return "foundation" if top in FOUNDATION else top


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_room_imports_only_what_the_design_allows(path: Path):
    room = room_of(path)
    allowed = ALLOWED[room] | {room, "foundation"}
    wrong = []
    for name in imported(path):
        parts = name.split(".")
        if parts[0] == "lepton_spark" and len(parts) > 1:
            target = "foundation" if parts[1] in FOUNDATION else parts[1]
            if target not in allowed:
                wrong.append(name)
        elif parts[0] in FORBIDDEN.get(room, set()):
            wrong.append(name)
    assert not wrong, f"{path.relative_to(ROOT)} ({room}) imports {sorted(set(wrong))}"


def fresh_interpreter(code: str) -> dict:
    """Run ``code`` in a new Python (this one's), which prints one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


RANK_SIDE = [
    "lepton_spark.training.worker",
    "lepton_spark.training.loop",
    "lepton_spark.training.kmeans",
    "lepton_spark.shards.loader",
    "lepton_spark.cluster.rank_main",
    "lepton_spark.distributed.rank",
    "lepton_spark.distributed.rank_context",
]


def test_the_rank_side_imports_neither_spark_nor_mlflow():
    found = fresh_interpreter(
        "import importlib, json, sys\n"
        f"for name in {RANK_SIDE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    assert "lepton_spark" in found and "torch" in found  # the imports did happen
    assert "pyspark" not in found and "py4j" not in found
    assert "mlflow" not in found


# What lepton-spark imports from outside: imported first, so that their own import-time warning
# filters (torch, numpy, urllib3 add some) are not taken for ours.
THIRD_PARTY = ["torch", "pyarrow", "pandas", "pyspark.sql", "pyspark.ml", "mlflow", "matplotlib"]


def test_importing_every_module_leaves_warnings_and_matplotlib_as_they_were():
    names = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in MODULES
    ]
    found = fresh_interpreter(
        "import importlib, json, sys, warnings\n"
        f"for name in {THIRD_PARTY!r}:\n"
        "    importlib.import_module(name)\n"
        "import matplotlib, mlflow.pyfunc, mlflow.pytorch, pyspark.ml.functions, requests\n"
        "filters = list(warnings.filters)\n"
        "backend = matplotlib.rcParams._get_backend_or_none()\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'filters_kept': warnings.filters == filters,\n"
        "    'backend': [backend, matplotlib.rcParams._get_backend_or_none()],\n"
        "    'pyplot': 'matplotlib.pyplot' in sys.modules}))\n"
    )
    assert found["filters_kept"]
    assert found["backend"][0] == found["backend"][1]
    assert not found["pyplot"]
