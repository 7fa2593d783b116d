# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
# Both set up .venv from nothing with cluster/install.sh (torch first, pinned to the CPU wheel, so nothing
# later pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.icdray-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml cluster/install.sh cluster/requirements/*.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU environment with the test tools; the same script builds the GPU environment and the images
	PYTHON=$(BIN)/python bash cluster/install.sh cpu --dev
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
