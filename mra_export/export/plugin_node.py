"""The ``MraAttention`` node of the plugin flavour: the contract the TensorRT plugin implements.

One node per layer replaces the attention core. TensorRT's ONNX parser finds the plugin by the
node's ``op_type`` (``MraAttention``) with ``plugin_version`` and ``plugin_namespace`` from its
attributes; its other attributes become plugin fields (INT as kINT32, STRING as kCHAR). The
domain, ``trt.plugins``, only keeps ONNX tools from mistaking it for a standard op.
``plugins/README.md`` states the same contract for the C++ side.
"""

from __future__ import annotations

import contextlib

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from ..errors import UserError
from ..fused import CUDA_HEAD_DIMS, mra_attention_op
from ..patching import MIN_HEAD_DIM, MraAttentionCore, attention_cores

DOMAIN = "trt.plugins"
OP_TYPE = "MraAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""

INPUTS = ("query", "key", "value", "mask")
TOKEN_MAJOR = [0, 2, 1, 3]  # [batch, heads, seq, head_dim] <-> [batch, seq, heads, head_dim]
NODE_LAYOUT = "bshd"  # the layout attribute the exporter writes
ATTRIBUTES = ("num_blocks", "approx_mode", "block_size", "initial_prior_first_n_blocks",
              "initial_prior_diagonal_n_blocks", "plugin_version", "plugin_namespace")
# The plugin refuses head dims outside CUDA_HEAD_DIMS at configurePlugin, which is only reached
# when TensorRT builds the engine: check_head_dim refuses them at export.


def check_head_dim(model_head_dim: int) -> None:
    """Refuse, before any work, a model whose attention the plugin cannot run."""
    head_dim = max(MIN_HEAD_DIM, model_head_dim)  # the patched model pads smaller ones to 32
    if head_dim not in CUDA_HEAD_DIMS:
        *others, last = CUDA_HEAD_DIMS
        raise UserError(f"the {OP_TYPE} plugin's CUDA kernels take head_dim "
                        f"{', '.join(map(str, others))} or {last} (smaller ones are padded to "
                        f"{MIN_HEAD_DIM}) and this model's is {model_head_dim}; "
                        "export it with --flavour portable to run it in onnxruntime")


def register_schema() -> None:
    """Register the node's schema with onnx (idempotent), so checkers validate it."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    param, attribute, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    onnx.defs.register_schema(OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc="MRA-2 attention of transformers' MRA models (mra-export plugins/README.md).",
        inputs=[param("query", "T", "[batch, heads, seq, head_dim]"),
                param("key", "T", "[batch, heads, seq, head_dim]"),
                param("value", "T", "[batch, heads, seq, head_dim]"),
                param("mask", "M", "[batch, seq], non-zero for real tokens")],
        outputs=[param("context", "T", "[batch, heads, seq, head_dim]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("M", ["tensor(int32)"], "token mask"),
        ],
        attributes=[
            attribute("num_blocks", kind.INT, "high-resolution blocks per (batch, head)"),
            attribute("approx_mode", kind.STRING, "'full' or 'sparse'"),
            attribute("block_size", kind.INT, "tokens per block (32)"),
            attribute("initial_prior_first_n_blocks", kind.INT, "prior: first block rows/cols"),
            attribute("initial_prior_diagonal_n_blocks", kind.INT, "prior: diagonal band"),
            attribute("layout", kind.STRING, "'bhsd' (the default) or 'bshd'", required=False),
            attribute("plugin_version", kind.STRING, "TensorRT plugin version"),
            attribute("plugin_namespace", kind.STRING, "TensorRT plugin namespace"),
        ],
    ))


def _to_onnx_node(query, key, value, mask, num_blocks: int, approx_mode: str, block_size: int,
                  initial_prior_first_n_blocks: int, initial_prior_diagonal_n_blocks: int):
    """The node on [batch, seq, heads, head_dim] tensors (layout "bshd"), between transposes
    that cancel those around it in the model's graph (its heads are split from, and merged
    back to, [batch, seq, hidden]), so the node reads the projections and feeds the output
    product with no transpose left."""
    plugins = onnxscript.values.Opset(DOMAIN, 1)
    op = onnxscript.opset18
    query, key, value = (op.Transpose(t, perm=TOKEN_MAJOR) for t in (query, key, value))
    context = plugins.MraAttention(
        query, key, value, mask, num_blocks=num_blocks, approx_mode=approx_mode,
        block_size=block_size, initial_prior_first_n_blocks=initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks, layout=NODE_LAYOUT,
        plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)
    return op.Transpose(context, perm=TOKEN_MAJOR)


def translation_table() -> dict:
    """For ``torch.onnx.export(custom_translation_table=...)``."""
    register_schema()
    return {torch.ops.mra_export.mra_attention.default: _to_onnx_node}


class PluginNodeCore(MraAttentionCore):
    """An attention core that traces as one call of the op (int32 mask)."""

    def forward(self, query, key, value, attention_mask, use_op: bool | None = None):
        return mra_attention_op(query, key, value, attention_mask.to(torch.int32),
                                self.num_blocks, self.approx_mode, self.block_size,
                                self.initial_prior_first_n_blocks,
                                self.initial_prior_diagonal_n_blocks)


@contextlib.contextmanager
def plugin_nodes(model: torch.nn.Module):
    """Within the block, every attention core of ``model`` traces as one call of the op, which
    the exporter's translation table makes this module's ``MraAttention`` node (plugin flavour)
    or ``attention_function``'s (portable flavour)."""
    cores = attention_cores(model)
    for core in cores:
        core.__class__ = PluginNodeCore
    try:
        yield
    finally:
        for core in cores:
            core.__class__ = MraAttentionCore
