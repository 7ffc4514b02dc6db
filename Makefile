# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_VERSION := 25.3

# Offline and private by default: no hub downloads, no analytics.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
# dvc.yaml's commands call `rlhf`, so the venv's bin goes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
# The machine's pip config may list local indexes that do not exist; their warnings are noise.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: setup labelstudio browser demo test test-fast bench lint format lock clean

setup: $(STAMP)

# Re-installs when the lock or the project metadata changes (a stale venv is rebuilt in place).
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, $(VENV) has {sys.version.split()[0]}"'
	$(BIN)/python -m pip install --quiet --upgrade pip==$(PIP_VERSION) $(PIP_QUIET)
	$(BIN)/python -m pip install --quiet -r requirements.lock $(PIP_QUIET)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . $(PIP_QUIET)
	$(BIN)/python -m pip check
	@touch $(STAMP)

# Label Studio (`rlhf annotate serve`, the collection tests) in its own venv: its pins (Django,
# pandas, sentry-sdk) clash with the project's lock. About 1 GB, 2-3 minutes; installed when
# first needed.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
labelstudio: $(LS_STAMP)

$(LS_STAMP): labelstudio/requirements.lock labelstudio/blank_db.py
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip==$(PIP_VERSION) $(PIP_QUIET)
	$(LS_VENV)/bin/python -m pip install --quiet --no-deps -r labelstudio/requirements.lock $(PIP_QUIET)
	$(LS_VENV)/bin/python -m pip check
	$(LS_VENV)/bin/python labelstudio/blank_db.py $(LS_VENV)/blank-db  # a first start in seconds
	@touch $(LS_STAMP)

# Headless Chromium for the labelling test in a real browser (tests/flows/test_collect.py,
# driven by Playwright): Debian's package, installed as root when missing. Another build:
# RLHF_CHROMIUM=/path/to/chromium make test.
RLHF_CHROMIUM ?= /usr/bin/chromium
export RLHF_CHROMIUM
browser:
	@test -x $(RLHF_CHROMIUM) || { apt-get update -qq && apt-get install -y -qq chromium > /dev/null; }

# The embedded demo: demo data (regenerated to the version in data.dvc), then the Prefect flow
# (ephemeral API) with MLflow's embedded store (mlflow.db); it ends with the key metrics, the
# promotion decision and the registry.
demo: setup
	$(BIN)/rlhf data demo --check
	$(BIN)/rlhf run
	$(BIN)/rlhf models

# The whole suite, in TEST_WORKERS pytest-xdist processes of one torch thread each (two threads
# per process on 2 cores would contend): one runs the demo pipeline that tests/model,
# tests/registry and the DVC and security tests share while the others run the rest, module by
# module (tests/conftest.py). It ends with the 15 slowest tests and the total time.
TEST_WORKERS ?= 2
test: setup labelstudio browser
	@start=$$(date +%s); status=0; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 || status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s in all"; exit $$status

# Unit and data tests only (no training, no demo run, no DVC, Prefect or MLflow server).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

# Every figure of bench/RESULTS.md, one benchmark after another (about 55 minutes on 2 cores;
# the machine should be otherwise idle). Each prints figures and asserts nothing.
bench: setup
	$(BIN)/python bench/demo_time.py
	$(BIN)/python bench/cached_rerun.py
	$(BIN)/python bench/pipeline_overhead.py
	$(BIN)/python bench/ppo_vs_trl.py
	$(BIN)/python bench/ppo_throughput.py
	$(BIN)/python bench/validate_gate.py --gigabytes 0.1 1

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-resolve the lock from pyproject.toml in a scratch venv (needs the package registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	.lock-venv/bin/python -m pip install --quiet ".[dev]"
	{ sed -n '1,/^setuptools==/p' requirements.lock | sed '$$d'; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable \
	    | grep -vE '^(pip|rlhf-pipeline)==' | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

clean:
	rm -rf artifacts .pytest_cache .ruff_cache  # mlflow.db and mlruns/ hold the registry: kept
