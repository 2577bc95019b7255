# Two commands for a fresh machine:  `make demo` (the main job) and `make test` (the tests).
# Each sets up what it needs: uv, a virtual environment with the CUDA builds of torch 2.13.0 and
# torchvision 0.28.0, and the nasprune extension compiled with its CUDA sources when nvcc exists.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
export MAX_JOBS ?= 2
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test test-fast bench env clean

DATA ?= digits

demo: $(VENV)/.built
	$(PY) -m nasprune.env
	$(PY) -m nasprune search --method tas --model resnet20 --data $(DATA) --flops-target 0.5 \
		--baseline-epochs 8 --epochs 10 --finetune-epochs 8 --batch-size 64 \
		--out runs/demo

test: $(VENV)/.built
	$(PY) -m nasprune.env
	$(PY) -m pytest -q tests --ignore-glob='*test_triton_interpret*'
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels/test_triton_interpret*.py

bench: $(VENV)/.built
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

env: $(VENV)/.built
	$(PY) -m nasprune.env

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install -q uv

$(VENV)/.deps: requirements-dev.txt | $(UV)
	$(UV) venv -q --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install -q --python $(PY) -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(UV) pip install -q --python $(PY) --no-build-isolation --no-deps --reinstall-package nasprune -e .
	touch $@

clean:
	rm -rf build nasprune/*.so $(VENV)/.built
