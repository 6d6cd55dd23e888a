# Two commands on a fresh machine: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel of torch is on the machine; install it first so the project's
# torch range is already satisfied and pip pulls no CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test plugins clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mra-export demo

test: setup
	$(PY) -m pytest -q

plugins: setup
	$(PY) -m mra_export.plugin_build

clean:
	rm -rf $(VENV) build plugins/build out
