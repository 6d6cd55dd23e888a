# Two commands on a fresh machine: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel of torch is on the machine; install it first so the project's
# torch range is already satisfied and pip pulls no CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test plugins triton-server clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

# TensorRT's and onnxruntime's public headers, where ../shared/third_party has them (CI does):
# `make demo` and `make test` then build the plugin over the emulated kernels and the
# onnxruntime op, and run them.
THIRD_PARTY := $(abspath ../shared/third_party)
SHARED_HEADERS := $(if $(wildcard $(THIRD_PARTY)/tensorrt/include/NvInferRuntime.h),TRT_INCLUDE_DIR=$(THIRD_PARTY)/tensorrt/include) \
  $(if $(wildcard $(THIRD_PARTY)/onnxruntime/include/onnxruntime_c_api.h),ORT_INCLUDE_DIR=$(THIRD_PARTY)/onnxruntime/include)

demo: setup
	$(MAKE) plugins $(SHARED_HEADERS)
	$(VENV)/bin/mra-export demo

# One pytest-xdist worker per core: the suite is mostly single-threaded tracing for export. Each
# test file runs in one worker, which builds its module fixtures once; the workers share the
# session fixtures' builds (tests/shared_builds.py). TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto
test: setup
	$(MAKE) plugins $(SHARED_HEADERS)
	$(MAKE) triton-server || echo "make test: no tritonserver here (said above); tests/test_triton.py skips"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The CPU reference always; the CUDA kernels when nvcc is found; the TensorRT plugin when its
# headers are found (TensorRT_ROOT=DIR or TRT_INCLUDE_DIR=DIR); the onnxruntime op when
# onnxruntime's C API headers are found (ORT_INCLUDE_DIR=DIR). CMake prints what it skipped.
PLUGIN_BUILD ?= plugins/build
plugins:
	cmake -S plugins -B $(PLUGIN_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  $(if $(TensorRT_ROOT),-DTensorRT_ROOT=$(TensorRT_ROOT)) \
	  $(if $(TRT_INCLUDE_DIR),-DTRT_INCLUDE_DIR=$(TRT_INCLUDE_DIR)) \
	  $(if $(ORT_INCLUDE_DIR),-DORT_INCLUDE_DIR=$(ORT_INCLUDE_DIR)) \
	  $(if $(MRA_CUDA_ARCHITECTURES),-DMRA_CUDA_ARCHITECTURES="$(MRA_CUDA_ARCHITECTURES)")
	cmake --build $(PLUGIN_BUILD) -j $$(nproc)

# Triton Inference Server from PyPI's nvidia-pytriton wheel (binary and python backend, no
# onnxruntime or TensorRT backend) into .triton/, for tests/test_triton.py and
# `python -m mra_export.serving.server`; fetched once, checked every time.
triton-server: setup
	$(PY) tools/fetch_tritonserver.py

clean:
	rm -rf $(VENV) build plugins/build out
