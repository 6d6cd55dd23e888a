"""The TensorRT plugin itself, from an ONNX node's fields to its output, on the CPU.

plugins/tests/pluginRunner.cpp drives the plugin library as TensorRT does (the parser's fields,
the build phase with an optimisation profile, the fields an engine stores, the runtime plugin,
attachToContext, onShapeChange, enqueue with a workspace of getWorkspaceSize bytes), and the
plugin is built over the CUDA kernels' source run under plugins/tests/cuda_emulation. So this
checks the plugin's own code (fields, types, shapes, workspace, the call into the kernels)
against the PyTorch reference, without TensorRT's libraries or a GPU. It needs TensorRT's headers
to compile: `make test` points CMake at ../shared/third_party/tensorrt/include where that folder
exists (as in CI); without them it skips, and tests/test_cuda_emulation.py checks the kernels
alone.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mra_export.attention import mra_attention
from mra_export.parity.inputs import parity_feeds
from mra_export.runtime.plugin_reference import ReferencePluginModel
from mra_export.tasks import TASKS

from .conftest import random_qkv, ragged_mask
from .test_export_onnxruntime import TOLERANCE as MODEL_TOLERANCE
from .test_export_onnxruntime import torch_outputs

TOLERANCE = 1e-5  # float32, against the PyTorch reference (issue 4)


def node_attributes(num_blocks, mode="full", first=0, diagonal=0) -> dict:
    """An MraAttention node's attributes, as the exporter writes them."""
    return dict(num_blocks=num_blocks, approx_mode=mode, block_size=32,
                initial_prior_first_n_blocks=first, initial_prior_diagonal_n_blocks=diagonal)


@pytest.mark.parametrize("seq_len,num_blocks,mode,priors", list(itertools.product(
    [1, 31, 100, 257], [1, 16, 100], ["full", "sparse"], [(0, 0), (2, 5)])))
def test_plugin_matches_pytorch_from_node_fields_to_output(emulated_plugin, seq_len, num_blocks,
                                                           mode, priors):
    q, k, v = random_qkv(3, 2, seq_len, 32, seed=seq_len + num_blocks)
    mask = ragged_mask(3, seq_len, [seq_len, seq_len // 2, 0])  # the last sample is all padding
    attributes = node_attributes(num_blocks, mode, *priors)
    ours = emulated_plugin.attention(q, k, v, mask, **attributes)
    expected = mra_attention(q, k, v, mask, **attributes)
    assert (ours - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_plugin_output_is_the_kernels_output_bit_for_bit(emulated_plugin, emulated_kernels, dtype,
                                                         head_dim):
    """The plugin maps its fields, types and shapes onto the kernels' parameters and adds
    nothing: the same bits as calling the kernels directly (tests/test_cuda_emulation.py holds
    those to the reference in every dtype)."""
    q, k, v = (t.to(dtype) for t in random_qkv(2, 3, 150, head_dim, seed=head_dim))
    mask = ragged_mask(2, 150, [150, 77])
    attributes = node_attributes(12, "full", 1, 3)
    ours = emulated_plugin.attention(q, k, v, mask, **attributes)
    direct, _ = emulated_kernels.attention(q, k, v, mask, **attributes)
    assert ours.dtype == dtype and torch.equal(ours, direct)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_layout_field_takes_token_major_tensors(emulated_plugin, dtype):
    """Field layout "bshd" (what the exporter writes): [batch, seq, heads, head_dim] in and out,
    the profile and the mask check along those axes; the head-major result transposed."""
    q, k, v = (t.to(dtype) for t in random_qkv(2, 3, 150, 64, seed=19))
    mask = ragged_mask(2, 150, [150, 61])
    attributes = node_attributes(12, "full", 1, 3)
    head_major = emulated_plugin.attention(q, k, v, mask, **attributes)
    token_major = emulated_plugin.attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)),
                                            mask, layout="bshd", **attributes)
    assert torch.equal(token_major, head_major.transpose(1, 2))
    with pytest.raises(RuntimeError, match="field layout has the wrong type or value"):
        emulated_plugin.attention(q, k, v, mask, layout="sbhd", **attributes)


@pytest.mark.parametrize("profile_max", [(2, 96), (8, 4096)])
def test_workspace_sized_at_the_profile_maxima_serves_smaller_shapes(emulated_plugin, profile_max):
    """getWorkspaceSize sees only the profile; enqueue runs at the input's shape within it."""
    q, k, v = random_qkv(2, 4, 96, 64, seed=5)
    mask = ragged_mask(2, 96, [96, 40])
    attributes = node_attributes(5, "full")
    ours = emulated_plugin.attention(q, k, v, mask, profile_max=profile_max, **attributes)
    assert (ours - mra_attention(q, k, v, mask, **attributes)).abs().max().item() <= TOLERANCE


def test_the_plugins_refusals_reach_the_caller_in_one_line(emulated_plugin):
    q, k, v = random_qkv(1, 2, 64, 48, seed=0)
    mask = torch.ones(1, 64)
    with pytest.raises(RuntimeError, match="configurePlugin refused: MraAttention: head_dim 48 is not "
                                           "supported"):
        emulated_plugin.attention(q, k, v, mask, **node_attributes(4))
    q, k, v = (t[..., :32].contiguous() for t in (q, k, v))
    with pytest.raises(RuntimeError, match="createPlugin .build phase. refused the node's fields: "
                                           ".*approx_mode has the wrong type or value"):
        emulated_plugin.attention(q, k, v, mask, **node_attributes(4, mode="dense"))
    with pytest.raises(RuntimeError, match="createPlugin .build phase. refused .*num_blocks must be >= 1"):
        emulated_plugin.attention(q, k, v, mask, **node_attributes(0))


@pytest.mark.slow
@pytest.mark.parametrize("task_name", list(TASKS))
def test_plugin_graph_with_the_plugin_itself_matches_pytorch(emulated_plugin, small_checkpoints,
                                                             exports, task_name):
    """Every head's plugin-flavour export, its MraAttention nodes run by the plugin (the
    attributes the exporter wrote, as TensorRT's parser passes them) and the rest by
    onnx.reference."""
    task = TASKS[task_name]
    model = ReferencePluginModel.from_pretrained(exports[task_name, "plugin"],
                                                 node="plugin-emulated")
    for feed in parity_feeds(task, model.config)[::3]:
        got = model(**feed)
        expected = torch_outputs(small_checkpoints[task_name], task, feed)
        for name in task.outputs:
            assert np.abs(got[name] - expected[name]).max() <= MODEL_TOLERANCE
