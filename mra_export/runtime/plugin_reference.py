"""The plugin flavour on the CPU: its graph run by ``onnx.reference``, with each ``MraAttention``
node computed by a reference implementation of the plugin.

This is how the plugin-flavour graph is checked where TensorRT is absent: everything except the
plugin node is the exported graph, executed by ONNX's own reference evaluator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_matmul import MatMul as OnnxMatMul

from ..attention import mra_attention
from ..errors import UserError, upgrade_fix
from ..export import plugin_node
from .base import ExportedModel


# The first onnx whose reference evaluator runs a bf16 graph: before it, onnx held bfloat16 as raw
# 16-bit integers (not ml_dtypes'), and the MraAttention node was handed their bits.
BF16_ONNX_FROM = "1.19"


def bf16_unsupported_reason(dtype: str) -> str | None:
    """Why onnx.reference cannot run a ``dtype`` graph with the installed onnx, or ``None``."""
    fix = upgrade_fix("onnx", onnx.__version__, BF16_ONNX_FROM) if dtype == "bf16" else None
    if fix is None:
        return None
    return (f"onnx {onnx.__version__}'s reference evaluator holds bfloat16 as raw integers and "
            f"cannot run a bf16 graph: {fix}")


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """numpy has no bfloat16 (onnx.reference uses ml_dtypes'): compute such arrays in float32."""
    if array.dtype not in (np.float32, np.float16, np.int32, np.int64):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def head_major(array: np.ndarray, layout: str) -> np.ndarray:
    """One of the node's tensors (query, key, value, its output) as [batch, heads, seq,
    head_dim]; layout "bshd" holds them as [batch, seq, heads, head_dim]. Swapping back is the
    same call."""
    return np.swapaxes(array, 1, 2) if layout == "bshd" else array


def torch_reference(query, key, value, mask, layout="bhsd", **settings) -> np.ndarray:
    """The node computed by ``mra_export.mra_attention`` (the PyTorch reference)."""
    tensors = [_as_torch(head_major(t, layout)) for t in (query, key, value)]
    return head_major(mra_attention(*tensors, _as_torch(mask), **settings).float().numpy(), layout)


def cpp_reference(query, key, value, mask, layout="bhsd", **settings) -> np.ndarray:
    """The node computed by the plugin's C++ CPU twin (``make plugins`` builds it)."""
    from ..native import MraLibrary

    tensors = [_as_torch(head_major(t, layout)) for t in (query, key, value)]
    output = MraLibrary.cpu().attention(*tensors, _as_torch(mask), **settings)[0].float().numpy()
    return head_major(output, layout)


def emulated_plugin(query, key, value, mask, layout="bhsd", **settings) -> np.ndarray:
    """The node computed by the TensorRT plugin itself, driven as TensorRT drives it (the
    node's layout among its fields), over the CUDA kernels' source run on the CPU (``make
    plugins`` with TensorRT's headers builds it)."""
    from ..native import PluginRunner

    tensors = [_as_torch(t) for t in (query, key, value)]
    if query.dtype.name == "bfloat16":  # exact: the values are bfloat16's
        tensors = [t.to(torch.bfloat16) for t in tensors]
    output = PluginRunner.emulated().attention(*tensors, _as_torch(mask), layout=layout, **settings)
    return output.float().numpy()


NODE_IMPLEMENTATIONS = {"torch": torch_reference, "cpp": cpp_reference,
                        "plugin-emulated": emulated_plugin}


def require_native_library(node: str) -> None:
    """Fail at load, in one line, where the node's library is not built (not at the first call)."""
    from ..native import MraLibrary, PluginRunner

    if node == "cpp":
        MraLibrary.cpu()
    elif node == "plugin-emulated":
        PluginRunner.emulated()


def node_settings(attributes: dict) -> dict:
    """The ``mra_attention`` keyword arguments of a node's attributes (strings decoded)."""
    def text(value):
        return value.decode() if isinstance(value, bytes) else value

    return dict(num_blocks=int(attributes["num_blocks"]),
                approx_mode=text(attributes["approx_mode"]),
                block_size=int(attributes["block_size"]),
                initial_prior_first_n_blocks=int(attributes["initial_prior_first_n_blocks"]),
                initial_prior_diagonal_n_blocks=int(attributes["initial_prior_diagonal_n_blocks"]))


def _node_class(implementation):
    class MraAttention(OpRun):
        op_domain = plugin_node.DOMAIN

        def _run(self, query, key, value, mask, num_blocks=None, approx_mode=None,
                 block_size=None, initial_prior_first_n_blocks=None,
                 initial_prior_diagonal_n_blocks=None, layout=None, plugin_version=None,
                 plugin_namespace=None):
            settings = node_settings(dict(
                num_blocks=num_blocks, approx_mode=approx_mode, block_size=block_size,
                initial_prior_first_n_blocks=initial_prior_first_n_blocks,
                initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks))
            layout = layout.decode() if isinstance(layout, bytes) else layout or "bhsd"
            output = implementation(query, key, value, mask, layout=layout, **settings)
            return (output.astype(query.dtype),)

    return MraAttention


class MatMul(OnnxMatMul):  # named as the op it stands in for: the evaluator reads the name
    """onnx.reference's MatMul, its product in its inputs' type. Before onnx 1.23, numpy's
    matmul of bfloat16 tensors of 3 dimensions or more came back float32, which the evaluator
    refused ("Output type mismatch ... (operator 'MatMul')"); onnx 1.23 casts back, as here."""

    def _run(self, a, b):
        (product,) = super()._run(a, b)
        return (product.astype(a.dtype, copy=False),)


class ReferencePluginModel(ExportedModel):
    """A plugin-flavour export run on the CPU by ``onnx.reference``."""

    def __init__(self, info, config, folder, node: str):
        super().__init__(info, config, folder)
        if not isinstance(node, str) or node not in NODE_IMPLEMENTATIONS:
            raise UserError(f"unknown MraAttention implementation {node!r}; choose one of: "
                            f"{', '.join(NODE_IMPLEMENTATIONS)}")
        reason = bf16_unsupported_reason(info.dtype)
        if reason:
            raise UserError(reason)
        require_native_library(node)
        self.node = node
        model = onnx.load(str(info.onnx_path(folder)))
        self.check_graph_interface([i.name for i in model.graph.input],
                                   [o.name for o in model.graph.output])
        node_class = _node_class(NODE_IMPLEMENTATIONS[node])
        self.evaluator = ReferenceEvaluator(model, new_ops=[node_class, MatMul])

    @classmethod
    def from_pretrained(cls, folder: str | Path, node: str = "torch",
                        verify: bool = True) -> ReferencePluginModel:
        info, config = cls.load_export(folder, verify)
        if info.flavour != "plugin":
            raise UserError(f"{folder} is a {info.flavour} export; the onnx.reference runner is "
                            "for plugin-flavour exports (use OrtMraModel for this one)")
        return cls(info, config, folder, node)

    def run_raw(self, arrays: dict[str, np.ndarray], extra_outputs=()) -> dict[str, np.ndarray]:
        names = self.output_names + [n for n in extra_outputs if n not in self.output_names]
        if not extra_outputs:
            return dict(zip(names, self.evaluator.run(names, arrays)))
        everything = self.evaluator.run(None, arrays, intermediate=True)
        return {name: everything[name] for name in names}
