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

demo: setup plugins
	$(VENV)/bin/mra-export demo

test: setup plugins
	$(PY) -m pytest -q

# The CPU reference always; the CUDA kernels when nvcc is found; the TensorRT plugin when its
# headers are found (TensorRT_ROOT=DIR or TRT_INCLUDE_DIR=DIR). CMake prints what it skipped.
PLUGIN_BUILD ?= plugins/build
plugins:
	cmake -S plugins -B $(PLUGIN_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  $(if $(TensorRT_ROOT),-DTensorRT_ROOT=$(TensorRT_ROOT)) \
	  $(if $(TRT_INCLUDE_DIR),-DTRT_INCLUDE_DIR=$(TRT_INCLUDE_DIR)) \
	  $(if $(MRA_CUDA_ARCHITECTURES),-DMRA_CUDA_ARCHITECTURES="$(MRA_CUDA_ARCHITECTURES)")
	cmake --build $(PLUGIN_BUILD) -j $$(nproc)

clean:
	rm -rf $(VENV) build plugins/build out
