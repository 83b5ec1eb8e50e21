# fqtrun: `make run` trains the default experiment, `make test` runs the suite.
# Both set themselves up on a fresh machine (a .venv in this folder) with the exact tested versions
# of constraints.txt. Another Python: `make PY=python3.12 test` (its own .venv-python3.12; VENV=<dir>
# puts the environment elsewhere).
PY ?= python3.11
VENV ?= $(if $(filter command line,$(origin PY)),.venv-$(notdir $(PY)),.venv)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: help install run test test-slow lint bench clean compare-qat reproduce-fqt reproduce-cpt reproduce-sparsity reproduce-ridge reproduce-lm reproduce-lm-techniques reproduce-lm-formats reproduce-lm-llama reproduce-numerics docs-tables

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# PY named on the command line must exist; the default falls back to python3 (pip then checks >= 3.11)
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { test "$(origin PY)" = file && python3 -m venv $(VENV); } \
		|| { echo "error: PY=$(PY) cannot create a virtual environment: pass PY=<a Python >= 3.11>" >&2; exit 1; }
	$(PIP_INSTALL) -e '.[dev,sweeps]'
	@touch $(STAMP)

install: $(STAMP)  ## create the venv if missing and install fqtrun + dev extras at constraints.txt's versions

run: install  ## train the default experiment (MNIST-1D CNN, full precision)
	$(BIN)/fqtrun train

test: install  ## run the test suite (what CI runs)
	$(BIN)/python -m pytest

test-slow: install  ## run the slow tests too
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install  ## ruff
	$(BIN)/ruff check fqtrun tests

bench: install  ## benchmarks: quantizers, FQT steps vs fp32/bf16/torchao, numerics probe, mask search (outputs/bench/bench.json)
	$(PIP_INSTALL) -e '.[bench]'
	$(BIN)/fqtrun bench hydra.run.dir=outputs/bench

# The docs tables (make docs-tables splices them in): `fqtrun reproduce <name>` runs conf/experiment/<name>.yaml into results/<name>
# (tables.md; finished runs are reused when re-run; `fqtrun report results/<name>` renders the tables again).
# jobs=2 trains two runs at a time; the figures do not depend on it, the wall-time columns do.
compare-qat: install  ## fp32 vs QAT 8/6/4-bit, MNIST-1D CNN and MLP, 5 seeds, portable (one run at a time: wall times)
	$(BIN)/fqtrun reproduce qat

reproduce-fqt: install  ## FQT: QAT vs PTQ/PSQ/BHQ at 4-8 bits, paper and strict protocols, variance plot
	$(BIN)/fqtrun reproduce fqt jobs=2

reproduce-cpt: install  ## static vs cyclic precision: accuracy and GBitOPs
	$(BIN)/fqtrun reproduce cpt jobs=2

reproduce-sparsity: install  ## dense vs 2:4, 2:4-T, 4:8-T, 2:4-T + BHQ 5-bit (one run at a time: train times)
	$(BIN)/fqtrun reproduce sparsity

reproduce-ridge: install  ## STE vs ridge dequantization; integer BN report (ResNet-20 / digits)
	$(BIN)/fqtrun reproduce ridge jobs=2

reproduce-lm-llama: install  ## the language-model tables: Llama-style model on BPE tokens, every technique and format recipe, verdicts
	$(BIN)/fqtrun reproduce lm_llama jobs=2

reproduce-lm: install  ## earlier measurement: fp32 character-level GPT on the embedded corpus, 3 seeds (report table, a sample)
	$(BIN)/fqtrun train -m model=gpt dataset=text dataset.tokenizer=char seed=0,1,2 threads=1 logger.wandb.mode=disabled \
		logger.progress=none skip_done=true hydra.sweep.dir=results/lm/fp32
	$(BIN)/fqtrun report results/lm/fp32
	$(BIN)/fqtrun sample checkpoint=results/lm/fp32/0 'prompt="The "' tokens=300 threads=1

reproduce-lm-techniques: install  ## earlier measurement: every technique on the character-level GPT (QAT, FQT, CPT, N:M, ridge), 3 seeds: loss, gap to fp32
	$(BIN)/fqtrun reproduce lm jobs=2

reproduce-lm-formats: install  ## earlier measurement: number-format recipes on the character-level GPT, 3 seeds, and the 4-bit variance study
	$(BIN)/fqtrun reproduce lm_formats jobs=2

reproduce-numerics: install  ## numerics health of a 4-bit PSQ run, portable: table and plot (results/numerics/tables.md)
	$(BIN)/fqtrun train +quant=per_sample bits=4 numerics.every=40 epochs=30 threads=1 numerics.portable=true hydra.run.dir=results/numerics
	$(BIN)/fqtrun report results/numerics out=results/numerics/report
	sed -e '1d' -e 's|](\([a-z_]*\.png\))|](report/\1)|' results/numerics/report/report.md > results/numerics/tables.md

docs-tables: install  ## splice each results/<name>/tables.md between its markers in docs/*.md (and copy its figures)
	$(BIN)/python -m fqtrun.report.publish results docs

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache bench*.json
	find . -name __pycache__ -prune -exec rm -rf {} +
