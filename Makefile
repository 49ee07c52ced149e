# Two commands do everything on a fresh machine: `make demo` and `make test`.
# CONSTRAINTS pins the CPU torch wheel (constraints.txt). A GPU user keeps their own torch with
#   make test CONSTRAINTS= VENV_FLAGS=--system-site-packages
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
STAMP := $(VENV)/.sdeflow-installed

.PHONY: setup lint test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_C) -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -m ''

demo: setup
	$(PY) -m sdeflow.cli.demo

bench: setup
	$(PY) benchmarks/solver_accuracy.py
	$(PY) benchmarks/nfe_vs_fid.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
