"""Stable names in an exported graph: its dynamic axes and each layer's attention context.

The exporter names symbolic axes ``s43`` and intermediate values after FX nodes; users and the
parity diagnostic need ``batch_size``/``sequence_length`` and ``attention_context.{layer}``.
"""

from __future__ import annotations

import re
from typing import Callable

import onnx_ir as ir

ATTENTION_CONTEXT = "attention_context.{layer}"
_CONTEXT = re.compile(r"attention_context\.(\d+)")
SYMBOL = re.compile(r"\bs\d+\b")  # torch.export's names for symbolic sizes


def name_dynamic_axes(model: ir.Model, axes: dict[str, tuple[str, ...]]) -> None:
    """Rename the exporter's symbols after the axes of the named graph inputs, everywhere."""
    symbol_names: dict[str, str] = {}
    for value in model.graph.inputs:
        for dim, axis in zip(value.shape or (), axes.get(value.name, ())):
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                symbol_names.setdefault(dim.value, axis)
    rename_symbols(model.graph, lambda symbol: symbol_names.get(symbol, symbol))


def rename_symbols(graph: ir.Graph, rename: Callable[[str], str]) -> None:
    """Replace each of torch.export's symbols (``s43``) in the shapes of ``graph``'s values,
    also inside expressions, by ``rename(symbol)``."""
    def renamed(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            return ir.SymbolicDim(SYMBOL.sub(lambda match: rename(match[0]), dim.value))
        return dim

    for value in _all_values(graph):
        if value.shape is not None:
            value.shape = ir.Shape([renamed(dim) for dim in value.shape])


def name_attention_contexts(model: ir.Model) -> None:
    """Name each layer's attention context ``attention_context.{layer}``. While traced, each
    layer's attention is one ``MraAttention`` node, in layer order (in the plugin flavour for
    good, in the portable one until the traced core's graph replaces it, keeping the names)."""
    nodes = [node for node in model.graph if node.op_type == "MraAttention"]
    if not nodes:
        raise RuntimeError("the traced graph has no MraAttention node; the exporter's custom "
                           "translation table may have changed")
    for layer, node in enumerate(nodes):
        node.outputs[0].name = ATTENTION_CONTEXT.format(layer=layer)


def attention_contexts(model: ir.Model) -> list[str]:
    """The names of the attention contexts in ``model``'s graph, in layer order."""
    names = {value.name for value in _all_values(model.graph)
             if value.name and _CONTEXT.fullmatch(value.name)}
    return sorted(names, key=lambda name: int(_CONTEXT.fullmatch(name)[1]))


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
