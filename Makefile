# `make test` and `make demo` each set up their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch (installed from local disk on our machines). Override, e.g.
#   make test TORCH_SPEC='torch>=2.2'     to let pip pick (a CUDA build on Linux).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: install test lint demo bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check bayes_router tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/bayes-router phase1 --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/bayes-router bench --out runs/bench

clean:
	rm -rf $(VENV) build *.egg-info
