"""The real TensorRT plugin (libmra_attention_plugin.so, the CUDA kernels) on a GPU, driven as
TensorRT drives it (skipped where there is no GPU or the libraries are not built).

plugins/tests/pluginRunner.cpp, built as libmra_attention_plugin_runner_cuda.so, gives the plugin
an ONNX node's fields as the parser does, builds it for a profile, recreates it from its
serialised fields and enqueues it, on device memory and a stream of its own (each workspace
poisoned and followed by a canary). tests/test_plugin_emulated.py runs the same steps over the
kernels' source on the CPU; here the plugin's output must be the bits of the kernels called
directly on the GPU (MraLibrary.cuda), in every dtype, and within kernel_check's tolerance of the
PyTorch reference.
"""

from __future__ import annotations

import pytest
import torch

from mra_export import native
from mra_export.kernel_check import compare_with_reference

from .conftest import random_qkv, ragged_mask

pytestmark = pytest.mark.gpu

# Against the PyTorch reference: fp32 absolute, fp16 and bf16 relative to the largest output, as
# tests/test_cuda_kernels.py holds the kernels.
TOLERANCES = {torch.float32: (1e-5, False), torch.float16: (2e-3, True),
              torch.bfloat16: (1e-2, True)}


def node_attributes(num_blocks, mode="full", first=0, diagonal=0) -> dict:
    """An MraAttention node's attributes, as the exporter writes them (as in
    tests/test_plugin_emulated.py, not imported: its imports need onnxruntime and more, which a
    GPU machine may lack)."""
    return dict(num_blocks=num_blocks, approx_mode=mode, block_size=32,
                initial_prior_first_n_blocks=first, initial_prior_diagonal_n_blocks=diagonal)


# (batch, heads, seq_len, head_dim, real tokens per sample, the node's attributes)
CASES = {
    "one-block-all-padding-sample": (3, 2, 31, 32, [31, 15, 0], node_attributes(1)),
    "odd-length-priors": (2, 3, 150, 64, [150, 77], node_attributes(12, "full", 1, 3)),
    "sparse-priors": (2, 4, 257, 128, [257, 200], node_attributes(16, "sparse", 2, 5)),
    "one-token-sample": (2, 2, 513, 32, [513, 1], node_attributes(100, "full", 0, 2)),
    "bert-heads": (1, 12, 1000, 64, [999], node_attributes(256, "sparse")),
}


@pytest.fixture(scope="module")
def gpu_plugin():
    """(the plugin through the runner, the kernels called directly), both from build_dir()."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (the real plugin runs on a machine with one)")
    missing = native.unbuilt(native.CUDA_LIBRARY, native.PLUGIN_LIBRARY,
                             native.PLUGIN_RUNNER_CUDA_LIBRARY)
    if missing:
        pytest.skip(f"not built: {', '.join(map(str, missing))} (make plugins with nvcc and "
                    "TensorRT's headers; MRA_EXPORT_PLUGIN_BUILD names another build folder)")
    return native.PluginRunner.cuda(), native.MraLibrary.cuda()


def inputs(case: str, dtype: torch.dtype):
    batch, heads, seq_len, head_dim, lengths, attributes = CASES[case]
    q, k, v = (t.to(dtype) for t in random_qkv(batch, heads, seq_len, head_dim, seed=seq_len))
    return q, k, v, ragged_mask(batch, seq_len, lengths), attributes


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_plugin_output_is_the_kernels_output_bit_for_bit(gpu_plugin, case, dtype):
    """From the node's fields to the engine's enqueue, the plugin adds nothing to the kernels:
    the same bits as calling them directly on the same inputs, and so the reference's answer."""
    runner, kernels = gpu_plugin
    q, k, v, mask, attributes = inputs(case, dtype)
    ours = runner.attention(q, k, v, mask, **attributes)
    direct, selected = kernels.attention(*(t.cuda() for t in (q, k, v, mask)), **attributes)
    assert ours.dtype == dtype and torch.equal(ours, direct.cpu())
    # The plugin's output, judged with the blocks the same kernels selected.
    tolerance, relative = TOLERANCES[dtype]
    result = compare_with_reference(ours, selected, q, k, v, mask, tolerance=tolerance,
                                    relative=relative, **attributes)
    assert result.passed, result.summary()


@pytest.mark.parametrize("profile_max", [(2, 96), (8, 4096)])
def test_workspace_sized_at_the_profile_maxima_serves_smaller_shapes(gpu_plugin, profile_max):
    """getWorkspaceSize sees only the profile; enqueue runs at the input's shape within it."""
    runner, kernels = gpu_plugin
    q, k, v = (t.half() for t in random_qkv(2, 4, 96, 64, seed=5))
    mask = ragged_mask(2, 96, [96, 40])
    attributes = node_attributes(5)
    ours = runner.attention(q, k, v, mask, profile_max=profile_max, **attributes)
    direct, _ = kernels.attention(*(t.cuda() for t in (q, k, v, mask)), **attributes)
    assert torch.equal(ours, direct.cpu())
