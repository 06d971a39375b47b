# Two commands on a fresh machine: `make demo` (sets up .venv if missing, runs the main job) and
# `make test` (sets up .venv if missing, runs the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test lint clean

$(VENV)/.installed: requirements.txt setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e '.[dev,torch,onnx,tracking]'
	# jax2onnx (ONNX export) without its dependencies: 0.17.1 pins orbax-checkpoint<0.11.37.
	$(PY) -m pip install -q --no-deps jax2onnx==0.17.1
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.demo --workdir $(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# ruff (lint at 100 columns) and the import direction (import-linter contracts in pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fcn_jax experiments benchmarks tests
	$(VENV)/bin/lint-imports

# Removes only what setup and the tests build here: never runs/ (training outputs) or the cache
# (~/.cache/fcn_jax: the compilation cache and the demo data, rebuilt on demand).
clean:
	rm -rf $(VENV) .pytest_cache fcn_jax.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
