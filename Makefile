# lepton-spark: everything a fresh machine needs, from the project's own files.
#   make demo   set up .venv and run the demo pipeline (1M rows, 2 Horovod ranks, MLflow)
#   make test   set up .venv and run the whole test suite
#   make bench  the benchmarks (ratios printed, JSON in benchmarks/results/)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lepton-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-connect test-fast lint format lock clean config-reference bench bench-data-path bench-memory \
	bench-scaling bench-petastorm bench-petastorm-env bench-recovery bench-scoring bench-tracking \
	bench-estimator bench-connect bench-engines bench-vs-torchdistributor bench-vs-horovod-run \
	bench-compression bench-scale bench-hf-finetune \
	wheel cluster-up cluster-down airflow-env

$(STAMP): pyproject.toml constraints.txt scripts/install_horovod.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	PYTHON=$(abspath $(BIN))/python bash scripts/install_horovod.sh
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/lepton-spark run pipelines/tabular_demo.yaml

# What spark-submit ships to executors (--py-files): lepton_spark as a pure-Python wheel, and the
# same archive named .zip (Spark puts .zip/.egg files on the executors' sys.path, not .whl ones).
wheel: setup
	rm -rf dist && $(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .
	cp dist/lepton_spark-*.whl dist/lepton_spark.zip

# A Spark standalone master + 2 workers (1 core each) on 127.0.0.1, from the pyspark install.
cluster-up: setup
	$(BIN)/lepton-spark cluster up --workers 2 --cores 1

cluster-down: setup
	$(BIN)/lepton-spark cluster down

# Airflow 3.3 for jobs/airflow/ in .venv-airflow: its pins clash with .venv's (tests make it too).
airflow-env:
	bash scripts/airflow_env.sh

# Everything over classic Spark, then the 'connect' tests again over a Spark Connect server.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest --spark-mode=connect $(PYTEST_ARGS)

test-connect: setup
	$(BIN)/python -m pytest --spark-mode=connect $(PYTEST_ARGS)

# Plain Python only (markers come from tests/conftest.py): no Spark, no Horovod ranks, not slow.
# -m "not slow" adds the quick Spark and barrier-stage tests (about 5 minutes on 2 cores).
test-fast: setup
	$(BIN)/python -m pytest -m "unit and not slow" $(PYTEST_ARGS)

# Benchmarks: measured side by side in one run, never timed tests (shared machines are noisy).
bench: bench-data-path bench-memory bench-scaling bench-petastorm bench-scoring bench-tracking \
	bench-estimator bench-connect bench-engines bench-vs-torchdistributor bench-vs-horovod-run \
	bench-compression bench-hf-finetune

bench-data-path: setup
	$(BIN)/python -m benchmarks.data_path

bench-memory: setup
	$(BIN)/python -m benchmarks.memory

bench-scaling: setup
	$(BIN)/python -m benchmarks.scaling

bench-engines: setup
	$(BIN)/python -m benchmarks.engines

bench-compression: setup
	$(BIN)/python -m benchmarks.compression

# The demo at 1M, 10M and 30M rows (the longest benchmark: not in `bench`, run it alone).
bench-scale: setup
	$(BIN)/python -m benchmarks.scale

bench-vs-torchdistributor: setup
	$(BIN)/python -m benchmarks.vs_torchdistributor

# HF Trainer needs accelerate (pyproject's `bench` extra), installed alone: not the whole project.
bench-hf-finetune: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "accelerate==1.16.0"
	$(BIN)/python -m benchmarks.hf_finetune

bench-vs-horovod-run: setup
	$(BIN)/python -m benchmarks.vs_horovod_run

bench-recovery: setup
	$(BIN)/python -m benchmarks.recovery

bench-scoring: setup
	$(BIN)/python -m benchmarks.scoring

bench-tracking: setup
	$(BIN)/python -m benchmarks.tracking

bench-estimator: setup
	$(BIN)/python -m benchmarks.estimator_vs_pipeline

bench-connect: setup
	$(BIN)/python -m benchmarks.connect_vs_classic

bench-petastorm: setup bench-petastorm-env
	$(BIN)/python -m benchmarks.vs_petastorm

# Petastorm 0.12.1 (its last release) imports pyarrow.filesystem, gone since pyarrow 13: it gets an
# environment of its own, outside the project's.
PETASTORM_STAMP := .venv-petastorm/.installed
bench-petastorm-env: $(PETASTORM_STAMP)

$(PETASTORM_STAMP):
	@test -x .venv-petastorm/bin/python || $(PYTHON) -m venv .venv-petastorm
	.venv-petastorm/bin/python -m pip install --quiet --disable-pip-version-check \
	  "torch==2.13.0" "pyspark==4.3.0" "pyarrow==12.0.1" "pandas<2.2" "numpy<2" "petastorm==0.12.1"
	@touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# docs/config-reference.md from the config's pydantic models (a test fails when it is stale).
config-reference: setup
	$(BIN)/python scripts/config_reference.py

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: setup
	@{ sed -n '1,4p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v -e '^horovod==' -e '^torch==' | sed 's/+cpu//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf .lepton mlruns-data .pytest_cache .ruff_cache
