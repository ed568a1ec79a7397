# `make compare` runs the main job (the variant comparison), `make test` the test suite.
# Both create the virtual environment in .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= cpu
WORKDIR ?= runs/compare

$(BIN)/python: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/python

.PHONY: venv test test-fast lint typecheck compare train clean
venv: $(BIN)/python

# Huge-page malloc for XLA:CPU's per-step buffers (ffn_jax/host.py; train.py sets it itself).
HUGEPAGES := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

test: $(BIN)/python
	$(HUGEPAGES) $(BIN)/python -m pytest

test-fast: $(BIN)/python
	$(HUGEPAGES) $(BIN)/python -m pytest -m "not slow"

lint: $(BIN)/python
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/python
	$(BIN)/pyright

compare: $(BIN)/python
	$(BIN)/python train.py --config=configs/compare.py:$(PRESET) --workdir=$(WORKDIR)
	$(BIN)/python eval.py --workdir=$(WORKDIR)

train: $(BIN)/python
	$(BIN)/python train.py --config=configs/base.py --workdir=runs/base
