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

.PHONY: setup lint test test-all demo bench bench-gpu clean

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

# FID sweep (solvers x NFE, 50k samples x 3 seeds, standard protocol; sdeflow.evaluation.fid_sweep) on a GPU:
#   make bench-gpu IMAGES=cifar10_train.npz INCEPTION=pt_inception-2015-12-05-6726825d.pth CKPT=runs/cifar/ckpt.pt \
#        CONSTRAINTS= VENV_FLAGS=--system-site-packages        # keep your own CUDA torch
# IMAGES: a folder / .npy / .npz of uint8 images; DIFFUSERS=DIR instead of CKPT for a diffusers model folder.
IMAGES ?=
INCEPTION ?=
CKPT ?=
DIFFUSERS ?=
FID_OUT ?= runs/bench/fid
FID_ARGS ?= --solvers ddim dpm_solver++ unipc heun euler_maruyama --nfe 10 20 50 100
bench-gpu: setup
	@test -n "$(IMAGES)" -a -n "$(INCEPTION)" -a -n "$(CKPT)$(DIFFUSERS)" || \
		{ echo "make bench-gpu needs IMAGES=... INCEPTION=... and CKPT=... or DIFFUSERS=..."; exit 2; }
	$(PY) -m sdeflow.cli bench --fid --images $(IMAGES) --inception-weights $(INCEPTION) \
		$(if $(DIFFUSERS),--diffusers $(DIFFUSERS),--ckpt $(CKPT)) --out $(FID_OUT) $(FID_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
