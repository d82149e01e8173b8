# Two entry points for a newcomer (see README):
#   make demo   -> creates .venv if missing, runs the tiny CPU pipeline and prints before/after metrics
#   make test   -> creates .venv if missing, runs the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= ppo_tiny
PYTEST_ARGS ?=

.PHONY: demo test test-fast env clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch first and pinned, so nothing below can pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

env: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m nemo_rlhf.train --config-name $(DEMO_CONFIG) hydra.run.dir=runs/demo_$(DEMO_CONFIG)

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -rs -m "not slow and not distributed" $(PYTEST_ARGS)

clean:
	rm -rf runs outputs multirun .pytest_cache
