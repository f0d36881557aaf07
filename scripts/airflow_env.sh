#!/usr/bin/env bash
# Create .venv-airflow: Apache Airflow for the lepton_spark_daily DAG (jobs/airflow/), in an
# environment of its own. Airflow's dependency pins clash with the project's (.venv), and the DAG
# only runs spark-submit as a subprocess, so the two never need to share an interpreter.
#
#   bash scripts/airflow_env.sh            # about 30 s cold on 2 cores, instant once installed
#   .venv-airflow/bin/airflow version
#
# The versions are the exact pins of scripts/airflow-requirements.txt (apache-airflow 3.3.2, which
# installs from PyPI without Airflow's constraints URL). A stamp in the environment records the
# pins' checksum: a second call returns at once, and changed pins are installed again.
#
# Environment:
#   PYTHON               interpreter for the new environment (default: python3.11, else python3)
#   LEPTON_AIRFLOW_VENV  where to put it (default: .venv-airflow in the repository root)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUIREMENTS="$ROOT/scripts/airflow-requirements.txt"
VENV=${LEPTON_AIRFLOW_VENV:-$ROOT/.venv-airflow}
STAMP="$VENV/.airflow-installed"

checksum=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
installed() { [ -x "$VENV/bin/airflow" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$checksum" ]; }
if installed; then
  exit 0
fi

mkdir -p "$VENV"
# Two callers at once (a test session and a shell, say): the second waits, then finds the stamp.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$VENV/.install.lock"
  flock 9
  if installed; then
    exit 0
  fi
fi

if [ -z "${PYTHON:-}" ]; then
  PYTHON=$(command -v python3.11 || command -v python3 || true)
fi
if [ -z "$PYTHON" ]; then
  echo "airflow_env.sh: no python3.11 or python3 on PATH; set PYTHON" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] < (3, 14))'; then
  echo "airflow_env.sh: $PYTHON is $("$PYTHON" -V 2>&1); Airflow 3.3 needs Python 3.10 to 3.13" >&2
  exit 1
fi

echo "installing Airflow into $VENV (pins: scripts/airflow-requirements.txt)"
rm -f "$STAMP"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
"$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null
# Not "airflow version": any airflow command creates $AIRFLOW_HOME (~/airflow) and its logs.
version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("apache-airflow"))')
echo "$checksum" >"$STAMP"
echo "Airflow $version ready: $VENV/bin/airflow"
