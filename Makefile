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

.PHONY: setup browser run test bench bench-data bench-serve bench-index screenshot ui clean prefect-server mlflow-server pools worker remote deploy trigger push

# torch first: `pip install torch==2.13.0` takes the local CPU build; installed later it would pull CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/seedlm run

test: setup browser
	$(BIN)/python -m pytest -q

# ruff lint + format check (the same hooks as .pre-commit-config.yaml; CI runs it)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Chromium for the browser test (tests/serving/test_web.py), from Debian's packages: Playwright cannot download
# its own browsers here. Idempotent: apt-get runs only when /usr/bin/chromium is missing. Outside CI a failed
# install is a warning (that test then skips, saying why); in CI (CI=true) it fails the build.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || .ci/install-browser

# Training throughput: seedlm's pretrain vs a bare PyTorch loop vs the HF Trainer (README, "Speed").
# Options through BENCH_ARGS, e.g. make bench BENCH_ARGS="--threads 1 --rounds 20".
bench: setup
	$(BIN)/python bench/train_bench.py $(BENCH_ARGS)

# Data: ingest and preprocess MB/s and peak memory at 16 and 256 MiB of local text, the tokenizers upper bound,
# 1 vs N workers, SFT packing vs padding (README, "Preprocessing at scale"). A few minutes; e.g.
# make bench-data DATA_BENCH_ARGS="--sizes 4,64 --workers 2".
bench-data: setup
	$(BIN)/python bench/data_bench.py $(DATA_BENCH_ARGS)

# Serving: `seedlm serve` under 1, 4 and 16 streaming clients vs bare model.generate, on the champion of
# `make run` (or BENCH_ARGS="--model DIR_OR_URI"). Prints the goal ratios; the last line is one JSON object.
bench-serve: setup
	$(BIN)/python bench/serve_bench.py $(BENCH_ARGS)

# Retrieval index: build MB/s and query p50/p95 at 10k, 100k, 1M chunks vs a brute-force scan, peak memory.
# Options through BENCH_ARGS, e.g. make bench-index BENCH_ARGS="--scales 10000,100000 --dense 64".
bench-index: setup
	$(BIN)/python bench/index_bench.py $(BENCH_ARGS)

# docs/chat-page.png: the web chat page in headless Chromium, answering with WEB_MODEL (default: the champion).
WEB_MODEL ?= models:/seedlm@champion
screenshot: setup browser
	SEEDLM_WEB_MODEL=$(WEB_MODEL) SEEDLM_SCREENSHOT=$(CURDIR)/docs/chat-page.png \
	$(BIN)/python -m pytest -q tests/serving/test_web.py -k streams

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf data/raw data/processed models reports metrics plots .seedlm mlflow.db mlruns dvc.lock

# ---- Operating it (README, "Operating it"): servers, pools, workers, deployments. Offline on one machine.
PREFECT_PORT    ?= 4200
MLFLOW_PORT     ?= 5000
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
MLFLOW_URL      ?= http://127.0.0.1:$(MLFLOW_PORT)
DVC_REMOTE      ?= $(CURDIR)/../seedlm-dvc-remote
POOL            ?= cpu
SCHEDULE        ?= nightly
PREFECT_ENV      = PREFECT_API_URL=$(PREFECT_API_URL)

# Recipes that start a long-running process `exec` it: a SIGTERM to make then reaches it (make forwards the
# signal to its child, which would otherwise be the shell, leaving the process running).
prefect-server: setup   ## Prefect server + UI on 127.0.0.1:$(PREFECT_PORT), run logs streamed to `--watch` (state in ~/.prefect)
	exec env PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PREFECT_PORT) \
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_UI_URL=http://127.0.0.1:$(PREFECT_PORT) \
	PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

mlflow-server: setup    ## MLflow tracking server, configured by environment only (sqlite + artifact root)
	mkdir -p .seedlm/mlflow-server
	exec env MLFLOW_BACKEND_STORE_URI=sqlite:///$(CURDIR)/.seedlm/mlflow-server/mlflow.db \
	MLFLOW_ARTIFACTS_DESTINATION=$(CURDIR)/.seedlm/mlflow-server/artifacts \
	MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=$(MLFLOW_PORT) MLFLOW_WORKERS=1 \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server

pools: setup            ## the cpu and gpu process work pools
	$(PREFECT_ENV) $(BIN)/prefect work-pool create cpu --type process --overwrite
	$(PREFECT_ENV) $(BIN)/prefect work-pool create gpu --type process --overwrite

worker: setup           ## a worker for POOL in its own clone of this checkout, .seedlm/workers/POOL, at HEAD
	dir=$$($(BIN)/python -m flows.deploy --worker-clone $(POOL)) && cd "$$dir" && \
	exec env $(PREFECT_ENV) $(abspath $(BIN))/prefect worker start --pool $(POOL) --type process

remote:                 ## the DVC remote stages share data through (commit .dvc/config afterwards)
	$(BIN)/dvc remote add -d -f seedlm $(DVC_REMOTE)

deploy: setup           ## seedlm/<schedule> + seedlm-stage/<stage> deployments, zombie-run automation
	$(PREFECT_ENV) $(BIN)/python -m flows.deploy --env MLFLOW_TRACKING_URI=$(MLFLOW_URL) --automations $(DEPLOY_ARGS)

trigger: setup          ## run the SCHEDULE deployment now and watch it
	$(PREFECT_ENV) $(BIN)/prefect deployment run seedlm/$(SCHEDULE) --watch $(RUN_ARGS)

push: setup             ## share this workspace's stage outputs and run-cache (incl. dvc exp runs) via the remote
	$(BIN)/python -m flows.dvcstage push --all-runs
