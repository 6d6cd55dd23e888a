"""What `make plugins` built: the CUDA kernel library and the TensorRT plugin's contract.

These need no GPU: the libraries are loaded and driven through their C and TensorRT interfaces.
A part that was not built (no nvcc, no TensorRT headers) is skipped with the reason.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from mra_export import native

from .conftest import built_or_skip

PLUGIN_TEST = "mra_attention_plugin_test"
REGISTRATION_TEST = "mra_attention_plugin_registration_test"  # against a fake libnvinfer


def test_cuda_library_exports_the_c_interface_with_the_cpu_layout(cpu_library):
    cuda = native.MraLibrary(built_or_skip(native.CUDA_LIBRARY))
    assert hasattr(cuda.lib, "mraAttentionCuda") and hasattr(cuda.lib, "mraLastCudaError")
    for shape, dtype in [((8, 12, 4096, 64), torch.float16), ((1, 2, 17, 32), torch.float32)]:
        params = cuda.params(torch.empty(shape, dtype=dtype), num_blocks=64)
        assert (cuda.lib.mraWorkspaceSize(ctypes.byref(params))
                == cpu_library.lib.mraWorkspaceSize(ctypes.byref(params)) > 0)


def test_cuda_entry_point_checks_arguments_before_touching_the_gpu():
    cuda = native.MraLibrary(built_or_skip(native.CUDA_LIBRARY))
    params = cuda.params(torch.empty(1, 1, 64, 96), num_blocks=4)  # head_dim 96
    null = ctypes.c_void_p(0)
    null_pointers = [null] * 6  # Q, K, V, mask, output, workspace
    assert cuda.lib.mraAttentionCuda(ctypes.byref(params), *null_pointers, 0, null) == 1
    fake = ctypes.c_void_p(256)  # never dereferenced: the checks come first
    status = cuda.lib.mraAttentionCuda(ctypes.byref(params), *[fake] * 6, ctypes.c_size_t(1 << 30), null)
    assert status == 2  # MRA_UNSUPPORTED: the kernels take head_dim 32, 64 and 128
    params = cuda.params(torch.empty(1, 1, 64, 64), num_blocks=4)
    status = cuda.lib.mraAttentionCuda(ctypes.byref(params), *[fake] * 6, ctypes.c_size_t(16), null)
    assert status == 3  # MRA_WORKSPACE_TOO_SMALL
    misaligned = [fake, ctypes.c_void_p(256 + 8), fake, fake, fake, fake]  # key 8 bytes off
    status = cuda.lib.mraAttentionCuda(ctypes.byref(params), *misaligned, ctypes.c_size_t(1 << 30),
                                       null)
    assert status == 1  # MRA_INVALID_ARGUMENT: Q, K, V and output move in 16-byte vectors


def test_plugin_contract_through_tensorrt_interfaces():
    program = built_or_skip(PLUGIN_TEST)
    library = built_or_skip(native.PLUGIN_LIBRARY)
    result = subprocess.run([str(program), str(library)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" passed, 0 failed")


@pytest.mark.parametrize("plugin,triton", [
    (native.PLUGIN_LIBRARY, native.TRITON_PLUGIN_LIBRARY),
    (native.PLUGIN_EMULATED_LIBRARY, native.TRITON_PLUGIN_EMULATED_LIBRARY)])
def test_only_the_triton_library_registers_the_plugin_when_opened(plugin, triton):
    """Opening the plugin library registers nothing (loadLibrary registers what getCreators
    returns, from inside TensorRT's dlopen of it); Triton's tensorrt backend only dlopens plugin
    libraries, so it gets the triton library, which registers the plugin library's creator once
    when opened after libnvinfer, nothing without it, and deregisters it when unloaded. Checked
    against a fake libnvinfer's registry, not TensorRT's."""
    program = built_or_skip(REGISTRATION_TEST)
    plugin, triton = built_or_skip(plugin), built_or_skip(triton)
    result = subprocess.run([str(program), str(plugin), str(triton)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" passed, 0 failed")


def configure_with_empty_folder(tmp_path, folder_name: str, option: str, unset: tuple[str, ...]):
    """``cmake -S plugins -D<option>=<an empty folder>`` in tmp_path, with the environment
    variables ``unset``: ``(the folder, CMake's result)``; configuring must succeed."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    wrong = tmp_path / folder_name
    wrong.mkdir()
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    result = subprocess.run(["cmake", "-S", str(native.BUILD_DIR.parent), "-B", str(tmp_path / "build"),
                             f"-D{option}={wrong}"], capture_output=True, text=True,
                            timeout=300, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    return wrong, result


def test_a_tensorrt_folder_without_headers_is_named_when_configuring(tmp_path):
    """`make plugins TensorRT_ROOT=<wrong folder>` says where it looked, not 'set TensorRT_ROOT'."""
    wrong, result = configure_with_empty_folder(tmp_path, "TensorRT-10", "TensorRT_ROOT",
                                                ("TRT_INCLUDE_DIR", "TensorRT_ROOT"))
    if "+ mra_attention_plugin (" in result.stdout:
        pytest.skip("TensorRT's headers are installed in a system folder, which CMake finds anyway")
    looked = f"no NvInferRuntime.h in {wrong}/include (TensorRT_ROOT is the folder holding include/)"
    assert f"SKIPPED mra_attention_plugin: {looked}" in result.stdout
    assert "the TensorRT plugin is not built" in " ".join(result.stderr.split())  # the warning
