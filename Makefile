# The README's commands. Each one creates the environment itself on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo train test lint bench chat-base
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The default job: train on the bundled Shakespeare for about 5 minutes, evaluate, sample.
demo train: setup
	$(BIN)/lmforge train

# The chat base model that post-training starts from (5-17 minutes by CPU): data, then pretraining.
chat-base: setup
	test -f data/chat_base/manifest.json || $(BIN)/lmforge prepare --config configs/prepare_chat_base.yaml --out data/chat_base
	$(BIN)/lmforge train --config configs/chat_base_cpu.yaml

test: setup
	$(BIN)/ruff check lmforge tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lmforge tests benchmarks
	$(BIN)/ruff format --check lmforge tests benchmarks

# Benchmarks print figures (see BENCHMARKS.md). The nanoGPT comparison needs a checkout of
# karpathy/nanoGPT: make bench NANOGPT=path/to/nanoGPT
bench: setup
	$(BIN)/python benchmarks/default_job.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/data_throughput.py
	test -z "$(NANOGPT)" || $(BIN)/python benchmarks/train_vs_nanogpt.py --nanogpt $(NANOGPT)
