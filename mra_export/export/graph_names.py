"""Stable names in an exported graph: its dynamic axes and each layer's attention context.

The exporter names symbolic axes ``s43`` and intermediate values after FX nodes; users and the
parity diagnostic need ``batch_size``/``sequence_length`` and ``attention_context.{layer}``.
Each layer's context is found through the exporter's ``pkg.torch.onnx.name_scopes`` metadata:
the float rank-4 value made inside ``...layer.{i}.attention.self.mra_core`` and used by the
same layer's self-attention outside the core (the core is its own module for this reason).
"""

from __future__ import annotations

import ast
import re

import onnx_ir as ir

ATTENTION_CONTEXT = "attention_context.{layer}"
_SCOPES = "pkg.torch.onnx.name_scopes"
_CORE_SCOPE = re.compile(r"layer\.(\d+)\.attention\.self\.mra_core$")
_SYMBOL = re.compile(r"\bs\d+\b")
_CONTEXT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def name_dynamic_axes(model: ir.Model, axes: dict[str, tuple[str, ...]]) -> None:
    """Rename the exporter's symbols after the axes of the named graph inputs, everywhere."""
    symbol_names: dict[str, str] = {}
    for value in model.graph.inputs:
        for dim, axis in zip(value.shape or (), axes.get(value.name, ())):
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                symbol_names.setdefault(dim.value, axis)

    def rename(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            return ir.SymbolicDim(_SYMBOL.sub(lambda m: symbol_names.get(m[0], m[0]), dim.value))
        return dim

    for value in _all_values(model.graph):
        if value.shape is not None:
            value.shape = ir.Shape([rename(dim) for dim in value.shape])


def name_attention_contexts(model: ir.Model) -> list[str]:
    """Name each layer's attention context ``attention_context.{layer}``; return the names.
    In the plugin flavour they are the ``MraAttention`` nodes' outputs, in layer order (the
    exporter's optimiser folds away the transposes around them, and with them the scopes)."""
    plugin_nodes = [node for node in model.graph if node.op_type == "MraAttention"]
    if plugin_nodes:
        return _name_contexts(dict(enumerate(node.outputs[0] for node in plugin_nodes)))
    found: dict[int, ir.Value] = {}
    for node in model.graph:
        core = _core_scope(node)
        if core is None:
            continue
        layer = int(_CORE_SCOPE.search(core)[1])
        for value in node.outputs:
            if _is_context(value, core):
                if layer in found and found[layer] is not value:
                    raise RuntimeError(f"two attention contexts found for layer {layer}")
                found[layer] = value
    if sorted(found) != list(range(len(found))) or not found:
        raise RuntimeError(f"could not locate every layer's attention context (found layers "
                           f"{sorted(found)}); the exporter's name-scope metadata may have changed")
    return _name_contexts(found)


def _name_contexts(found: dict[int, ir.Value]) -> list[str]:
    names = []
    for layer in sorted(found):
        found[layer].name = ATTENTION_CONTEXT.format(layer=layer)
        names.append(found[layer].name)
    return names


def _core_scope(node: ir.Node) -> str | None:
    """The ``...mra_core`` module scope a node was traced in, if any."""
    return next((scope for scope in _scopes(node) if _CORE_SCOPE.search(scope)), None)


def _scopes(node: ir.Node) -> list[str]:
    text = node.metadata_props.get(_SCOPES)
    return ast.literal_eval(text) if text else []


def _is_context(value: ir.Value, core: str) -> bool:
    if value.dtype not in _CONTEXT_TYPES or value.shape is None or len(value.shape) != 4:
        return False
    self_attention = core.rsplit(".", 1)[0]
    for use in value.uses():
        scopes = _scopes(use.node)
        if self_attention in scopes and core not in scopes:
            return True
    return False


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
