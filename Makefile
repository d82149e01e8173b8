# Two entry points for a newcomer (see README):
#   make demo   -> creates .venv if missing, runs the tiny CPU pipeline and prints before/after metrics
#   make test   -> the test suite (what .ci/run calls) on both tested stacks: the full suite in .venv
#                  (Python 3.11, megatron-core 0.16.1), then the unit and multi-rank tiers in .venv-py312
#                  (Python 3.12, the newest megatron-core pip resolves: what NGC users get)
#   make test-main -> only the first (no Python 3.12 needed)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pyenv installs keep python3.12 behind PYENV_VERSION; elsewhere the variable is ignored
PYTHON312 ?= env PYENV_VERSION=3.12.1 python3.12
VENV312 ?= .venv-py312
PY312 := $(VENV312)/bin/python
DEMO_CONFIG ?= ppo_tiny
PYTEST_ARGS ?=

.PHONY: demo test test-main test-newest test-fast env env-newest clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch first and pinned, so nothing below can pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

env: $(VENV)/.installed

# No CPU wheel of torch 2.13.0 for Python 3.12 on the local index: pip takes the registry's build
# (CUDA libraries included, about 5 GB in the venv; it runs on the CPU).
$(VENV312)/.installed: pyproject.toml
	@test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q --upgrade pip
	$(PY312) -c "import torch" 2>/dev/null || $(PY312) -m pip install -q torch==2.13.0
	$(PY312) -m pip install -q -e '.[test]'
	@touch $@

env-newest: $(VENV312)/.installed

demo: $(VENV)/.installed
	$(PY) -m nemo_rlhf.train --config-name $(DEMO_CONFIG) hydra.run.dir=runs/demo_$(DEMO_CONFIG)

test: test-main test-newest

test-main: $(VENV)/.installed
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

# the multi-rank launch first (as in test-main's order): it shares the 2 cores with the pytest process
test-newest: $(VENV312)/.installed
	$(PY312) -m pytest -q -rs --durations=5 tests/distributed tests/unit $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -rs -m "not slow and not distributed" $(PYTEST_ARGS)

clean:
	rm -rf runs outputs multirun .pytest_cache
