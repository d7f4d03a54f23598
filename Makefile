# `make test` and `make demo` each set up their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch (installed from local disk on our machines). Override, e.g.
#   make test TORCH_SPEC='torch>=2.4'     to let pip pick (a CUDA build on Linux).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
# The demo: Phase 1 on the recall-far oracle task, where the routing choice matters (the power
# check passes) and the whole comparison (5 routers x 3 seeds) fits in minutes on 2 cores.
DEMO_ARGS ?= --corpus synthetic:recall-far --seq-len 32 --max-seq-len 32 --window 4 \
	--lr 1e-3 --steps 1200 --eval-every 300 --checkpoint-every 600 --seeds 3 --jobs 2

.PHONY: install test lint demo bench gpu-check clean

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
	$(BIN)/bayes-router phase1 --out $(DEMO_OUT) $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/bayes-router bench --out runs/bench

# On a CUDA machine (install a CUDA build: make gpu-check TORCH_SPEC='torch>=2.4'): the device
# tests, training on the GPU (and on 2 GPUs when present) and the bench, into one JSON.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out runs/gpu-check

clean:
	rm -rf $(VENV) build *.egg-info
