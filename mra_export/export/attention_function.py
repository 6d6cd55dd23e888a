"""The portable flavour's attention, traced once and inlined into every layer.

torch.export runs each of the attention's few hundred nodes through FakeTensor dispatch with
symbolic shapes, and it did so for every layer: about 20 s a layer on the 2-core machine, most
of a portable export's time, for the same graph each time. So the exporter traces the model with
each layer's attention as one node (as in the plugin flavour), traces one attention core alone
on the inputs the first layer's gets, and inlines that graph into every node: the saved file
holds the same standard ONNX ops as a layer-by-layer trace, and no function or custom domain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import onnxscript
import onnxscript.optimizer
import torch
from onnx.defs import OpSchema
from onnx_ir.passes.common import InlinePass

from ..patching import attention_cores
from . import graph_names, tracing

DOMAIN = "mra_export.functions"  # exists only between the trace and the inlining
OP_TYPE = "MraAttention"
INPUTS = ("query", "key", "value", "mask")
# [B, H, S, D] inputs' batch and sequence axes -> the same axes of the [B, S] mask
_MASK_AXIS = {0: 0, 2: 1}
_traced: dict[tuple, bytes] = {}  # traced_core's, by settings, shapes, dtypes and opset
_reuse = False  # within reusing_traces()


class CoreOfTheNode(torch.nn.Module):
    """One layer's attention core as the node calls it: with the int32 mask the node takes
    (``plugin_node.plugin_nodes`` makes every core such a node)."""

    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, query, key, value, mask):
        return self.core(query, key, value, mask.to(torch.float32), use_op=False)


def traced_core(model: torch.nn.Module, inputs: dict, opset: int) -> ir.Model:
    """The first layer's attention core of ``model`` traced alone, on what it gets from
    ``inputs``; within ``reusing_traces``, once for each settings, shapes, dtypes and opset."""
    core, *others = attention_cores(model)
    if any(other.settings() != core.settings() for other in others):  # one config, so never
        raise RuntimeError("the model's layers have different MRA settings; one traced core "
                           "cannot stand for every layer")
    core_inputs = dict(zip(INPUTS, first_core_inputs(model, core, inputs)))
    key = (tuple(core.settings().items()), opset,
           tuple((tuple(t.shape), t.dtype) for t in core_inputs.values()))
    if _reuse and key in _traced:
        # A fresh parse each time: a model parsed from a proto shares its tensors' protos, and
        # saving a graph that inlined it writes the constants' new names into them.
        return ir.from_proto(onnx.ModelProto.FromString(_traced[key]))
    graph = tracing.onnx_graph(CoreOfTheNode(core).eval(), core_inputs,
                               dict(zip(INPUTS, dynamic_shapes())), opset, ["context"])
    if _reuse:
        _traced[key] = ir.to_proto(graph).SerializeToString()
    return graph


@contextlib.contextmanager
def reusing_traces():
    """Within the block, exports whose attention has the same settings, shapes, dtypes and opset
    trace it once (the demo's six heads, the tests'). Not by default: a trace is known by those,
    not by the code it ran, and a tool may patch the attention between two exports
    (``tools/speed_ceiling.py`` does)."""
    global _reuse
    outer, _reuse = _reuse, True
    try:
        yield
    finally:
        _reuse = outer


def first_core_inputs(model: torch.nn.Module, core: torch.nn.Module,
                      inputs: dict) -> tuple[torch.Tensor, ...]:
    """The query, key, value and int32 mask ``core`` (the first layer's) gets when ``model``
    runs on ``inputs``: the core is traced alone on them, so that it sees the shapes and dtypes
    it sees in the model."""
    seen = []
    hook = core.register_forward_pre_hook(
        lambda module, args: seen.append(args[:4]))
    try:
        with torch.no_grad():
            model(**inputs, return_dict=True)
    finally:
        hook.remove()
    query, key, value, mask = seen[0]
    return query, key, value, mask.to(torch.int32)


def dynamic_shapes() -> tuple[dict, ...]:
    """Batch and sequence of query/key/value ``[B, H, S, D]`` and the mask ``[B, S]``."""
    dynamic = torch.export.Dim.DYNAMIC
    return ({0: dynamic, 2: dynamic},) * 3 + ({0: dynamic, 1: dynamic},)


def register_schema() -> None:
    """The node's schema, which torch.onnx's translation needs (idempotent)."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        OP_TYPE, DOMAIN, 1, doc="An MRA attention core, inlined before the export is saved.",
        inputs=[param(name, "M" if name == "mask" else "T", "") for name in INPUTS],
        outputs=[param("context", "T", "")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")]))


def translation_table() -> dict:
    """For ``torch.onnx.export(custom_translation_table=...)``: each layer's attention op as one
    node. Every layer of an MRA model has its config's settings, which the traced core holds."""
    register_schema()
    functions = onnxscript.values.Opset(DOMAIN, 1)

    def to_node(query, key, value, mask, *settings):
        return functions.MraAttention(query, key, value, mask)

    return {torch.ops.mra_export.mra_attention.default: to_node}


def inline(model: ir.Model, core: ir.Model) -> None:
    """Replace every ``MraAttention`` node of ``model`` by the traced ``core``'s graph, then
    optimise the whole graph as torch.onnx does (so that what every layer computes alike from
    the mask is computed once)."""
    first = next(node for node in model.graph if node.domain == DOMAIN)
    function = _as_function(core, first.inputs)
    model.functions[function.identifier()] = function
    InlinePass()(model)  # also drops the function it inlined
    onnxscript.optimizer.optimize_ir(model)  # also drops the opsets no node uses


def _as_function(core: ir.Model, model_inputs: Sequence[ir.Value]) -> ir.Function:
    """The traced core's graph as a function, its constants as nodes (a function has no
    initializers) and its symbolic sizes in the model's names: the core's trace named batch and
    sequence ``s0``, ``s31``, ..., and so does the model's, for other sizes."""
    graph = core.graph
    for name, initializer in list(graph.initializers.items()):
        constant = ir.node("Constant", [], attributes={"value": initializer.const_value},
                           name=f"constant_{name}")
        graph.insert_before(graph.node(0), constant)
        initializer.replace_all_uses_with(constant.outputs[0])
        constant.outputs[0].name = name
        graph.initializers.pop(name)
    _read_sizes_from_the_mask(graph)
    renames = _symbol_renames(graph, model_inputs)
    graph_names.rename_symbols(graph, lambda symbol: renames.get(symbol, f"attention_{symbol}"))
    return ir.Function(DOMAIN, OP_TYPE, "", graph=graph, attributes=[])


def _read_sizes_from_the_mask(graph: ir.Graph) -> None:
    """Make the core read batch and sequence from its mask, not from its query, key or value.
    The trace reads each from whichever input it met first; every layer's mask is the same
    value, so once inlined, these sizes and what is computed from them are computed once for
    all layers (the optimiser's common subexpressions), not once a layer."""
    *tensors, mask = graph.inputs
    for node in graph:
        if node.op_type != "Shape" or node.inputs[0] not in tensors:
            continue
        start, end = (node.attributes.get_int(name) for name in ("start", "end"))
        if start in _MASK_AXIS and end == start + 1:
            axis = _MASK_AXIS[start]
            node.replace_input_with(0, mask)
            node.attributes["start"] = ir.AttrInt64("start", axis)
            node.attributes["end"] = ir.AttrInt64("end", axis + 1)


def _symbol_renames(graph: ir.Graph, model_inputs: Sequence[ir.Value]) -> dict[str, str]:
    """Each symbol of the core's inputs -> the size the model gives that axis of the node's
    input (first one wins: the core's trace may unify axes that the model's did not, equal at
    run time either way)."""
    renames: dict[str, str] = {}
    for value, model_value in zip(graph.inputs, model_inputs):
        if value.shape is None or model_value.shape is None:
            continue
        for dim, model_dim in zip(value.shape, model_value.shape):
            expression = _expression(model_dim)
            if isinstance(dim, ir.SymbolicDim) and _is_symbol(dim.value) and expression:
                renames.setdefault(dim.value, expression)
    return renames


def _is_symbol(text: str | None) -> bool:
    return bool(text) and graph_names.SYMBOL.fullmatch(text) is not None


def _expression(dim) -> str | None:
    """A model's size as text to put in the core's expressions (None where it has no name)."""
    if isinstance(dim, ir.SymbolicDim):
        if not dim.value:
            return None
        return dim.value if _is_symbol(dim.value) else f"({dim.value})"
    return str(dim)
