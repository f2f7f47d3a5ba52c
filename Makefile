# seedlm: `make run` sets up and runs the pipeline on the embedded default; `make test` sets up and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline-friendly, quiet defaults (override in the environment).
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export MLFLOW_DISABLE_TELEMETRY = true
export DO_NOT_TRACK = true
export PYTHONUNBUFFERED = 1

.PHONY: setup run test bench ui clean

# torch first: `pip install torch==2.13.0` takes the local CPU build; installed later it would pull CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m flows.pipeline

test: setup
	$(BIN)/python -m pytest -q

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf data/raw data/processed models reports metrics plots .seedlm mlflow.db mlruns dvc.lock
