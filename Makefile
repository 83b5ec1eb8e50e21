# fqtrun: `make run` trains the default experiment, `make test` runs the suite.
# Both set themselves up on a fresh machine (a .venv in this folder).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install run test test-slow lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,sweeps]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv if missing and install fqtrun with its dev extras (idempotent)

run: install  ## train the default experiment (MNIST-1D CNN, full precision)
	$(BIN)/fqtrun train

test: install  ## run the test suite (what CI runs)
	$(BIN)/python -m pytest

test-slow: install  ## run the slow tests too
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install  ## ruff
	$(BIN)/ruff check fqtrun tests scripts

bench: install  ## benchmarks: quantizers and FQT steps vs fp32/bf16 (bench.json), mask search (bench_masks.json)
	$(BIN)/fqtrun bench hydra.run.dir=outputs/bench
	$(BIN)/python scripts/bench_masks.py --out bench_masks.json

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache bench*.json
	find . -name __pycache__ -prune -exec rm -rf {} +
