# mmdist: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV := .venv
PY := $(VENV)/bin/python
MMDIST := $(VENV)/bin/mmdist
# Compiled DeepSpeed ops (shm comm, fused/CPU Adam) are cached here so they build once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: help setup demo test test-unit test-integration lint format bench-ingest bench-train bench-zero clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# Bytecode is compiled at install: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE
# is set (containers often set it) every process, every Ray worker included, compiled torch, Ray,
# DeepSpeed and MLflow from source again (figures in docs/performance.md). A stale .pyc of mmdist
# is ignored, never wrong.
setup:  ## bootstrap uv if missing, create .venv, install the locked dependencies + mmdist (editable)
	@command -v uv >/dev/null 2>&1 || python3 -c "import uv" 2>/dev/null || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet --compile-bytecode
	@$(PY) -m compileall -q mmdist jobs >/dev/null
	@mkdir -p $(TORCH_EXTENSIONS_DIR)
	@$(PY) -m mmdist.train.ops 2>.cache/ops-build.log || { cat .cache/ops-build.log; exit 1; }

demo: setup  ## prepare synthetic data, train on 2 Ray workers with ZeRO-2, register the model
	$(MMDIST) train --config demo

test: setup  ## the whole suite: unit + integration (real Ray, DeepSpeed, MLflow)
	$(PY) -m pytest tests

test-unit: setup  ## unit tests only (fast)
	$(PY) -m pytest tests/unit

test-integration: setup  ## integration tests only
	$(PY) -m pytest tests/integration

lint: setup  ## ruff
	$(VENV)/bin/ruff check mmdist jobs tests

format: setup  ## ruff format + import sort
	$(VENV)/bin/ruff check --fix --select I mmdist jobs tests
	$(VENV)/bin/ruff format mmdist jobs tests

bench-ingest: setup  ## Ray Data vs DataLoader, same preprocessing, same cores
	$(MMDIST) bench ingest

bench-train: setup  ## TorchTrainer+DeepSpeed (1 worker) vs the same engine without Ray vs a plain loop
	$(MMDIST) bench train

bench-zero: setup  ## ZeRO-3 bytes per rank, 2 ranks vs 1
	$(MMDIST) bench zero

clean:  ## remove local runs, MLflow store and caches (keeps .venv)
	rm -rf runs mlruns mlflow.db .pytest_cache .ruff_cache

# ---- clusters (cluster/README.md) -------------------------------------------------------------
CONFIG ?= demo
ARGS ?=
.PHONY: cluster-up cluster-down submit-train submit-sweep preflight

cluster-up: setup  ## start a local Ray head (token auth) + MLflow server on 127.0.0.1; writes .cluster/env
	cluster/local/up.sh

cluster-down:  ## stop the local Ray head and MLflow server (by their PIDs)
	cluster/local/down.sh

preflight: setup  ## check the cluster in $MMDIST_CLUSTER_DIR/env (.cluster/env) can run CONFIG=... ARGS="key=value ..."
	set -a; env_file="$${MMDIST_CLUSTER_DIR:-.cluster}/env"; [ ! -f "$$env_file" ] || . "$$env_file"; set +a; \
	$(MMDIST) preflight --config $(CONFIG) $(ARGS)

submit-train: setup  ## preflight, then `ray job submit` jobs/train.py (CONFIG=..., ARGS="key=value ...")
	cluster/submit.sh jobs/train.py --config $(CONFIG) $(ARGS)

submit-sweep: setup  ## preflight, then `ray job submit` jobs/sweep.py (CONFIG=..., ARGS="key=value ...")
	cluster/submit.sh jobs/sweep.py --config $(CONFIG) $(ARGS)
