"""The portable export's attention: one core traced alone, inlined into every layer's node
(mra_export/export/attention_function.py). Here with a stand-in core, so that what the inlining
does and when a trace is reused are checked in seconds; the exports themselves are checked
against PyTorch in test_export_onnxruntime.py and test_parity.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers import MraConfig, MraModel

from mra_export.export import attention_function, reusing_traces, tracing
from mra_export.export.exporter import example_inputs
from mra_export.patching import attention_cores, patch_model
from mra_export.tasks import TASKS

from .conftest import ONE_LAYER_MODEL, onnx_model

BIAS = 1.5
HEADS, HEAD_DIM = 2, 64


def stand_in_core() -> ir.Model:
    """A core as torch.onnx traces one: its own symbols (s31, s0), a constant as an
    initializer named as torch.onnx names values, and the sequence length read from the key.
    context = query + 1.5 + S."""
    qkv = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["s31", HEADS, "s0", HEAD_DIM])
           for name in ("query", "key", "value")]
    mask = helper.make_tensor_value_info("mask", TensorProto.INT32, ["s31", "s0"])
    nodes = [helper.make_node("Shape", ["key"], ["length"], start=2, end=3),
             helper.make_node("Cast", ["length"], ["length_float"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["query", "val_2"], ["biased"]),
             helper.make_node("Add", ["biased", "length_float"], ["context"])]
    graph = helper.make_graph(
        nodes, "core", [*qkv, mask],
        [helper.make_tensor_value_info("context", TensorProto.FLOAT,
                                       ["s31", HEADS, "s0", HEAD_DIM])],
        initializer=[helper.make_tensor("val_2", TensorProto.FLOAT, [], [BIAS])],
        value_info=[helper.make_tensor_value_info("biased", TensorProto.FLOAT,
                                                  ["s31", HEADS, "s0", HEAD_DIM])])
    return ir.from_proto(onnx_model(graph))


def two_layer_graph() -> ir.Model:
    """Two layers' attention nodes as the model's trace leaves them, in the model's sizes. Its
    values are named as torch.onnx names them too, so the core's constant gets a new name when
    inlined."""
    qkv = [helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                         ["batch_size", HEADS, "sequence_length", HEAD_DIM])
           for name in ("query", "key", "value")]
    mask = helper.make_tensor_value_info("mask", TensorProto.INT32,
                                         ["batch_size", "sequence_length"])
    call = dict(op_type="MraAttention", domain=attention_function.DOMAIN)
    nodes = [helper.make_node("Identity", ["query"], ["val_2"]),
             helper.make_node(inputs=["val_2", "key", "value", "mask"],
                              outputs=["attention_context.0"], **call),
             helper.make_node(inputs=["attention_context.0", "key", "value", "mask"],
                              outputs=["attention_context.1"], **call)]
    graph = helper.make_graph(nodes, "model", [*qkv, mask], [
        helper.make_tensor_value_info("attention_context.1", TensorProto.FLOAT,
                                      ["batch_size", HEADS, "sequence_length", HEAD_DIM])])
    return ir.from_proto(onnx_model(graph, {"": 20, attention_function.DOMAIN: 1}))


def run(model: ir.Model, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The graph's output on onnxruntime CPU for random query/key/value, and the query."""
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    feed = {name: generator.standard_normal((batch, HEADS, length, HEAD_DIM), np.float32)
            for name in ("query", "key", "value")}
    feed["mask"] = np.ones((batch, length), np.int32)
    return session.run(None, feed)[0], feed["query"]


def test_each_node_becomes_the_core_in_plain_onnx_with_the_models_sizes():
    model = two_layer_graph()
    attention_function.inline(model, stand_in_core())
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert not proto.functions
    assert [opset.domain for opset in proto.opset_import] == [""]
    # The contexts keep their names, and the core's sizes are named as the model's.
    assert {value.name for node in model.graph for value in node.outputs} >= {
        "attention_context.0", "attention_context.1"}
    dims = {dim.value for node in model.graph for value in node.outputs
            if value.shape is not None for dim in value.shape if isinstance(dim, ir.SymbolicDim)}
    assert "sequence_length" in dims and not {dim for dim in dims if dim and "s0" in dim}
    # Both layers read the length from the mask, so the graph reads it once.
    shapes = [node for node in model.graph if node.op_type == "Shape"]
    assert [(node.inputs[0].name, node.attributes.get_int("start")) for node in shapes] == [
        ("mask", 1)]
    for batch, length in ((1, 1), (3, 70)):
        context, query = run(model, batch, length)
        np.testing.assert_allclose(context, query + 2 * (BIAS + length), rtol=1e-6)


@pytest.fixture
def traces(monkeypatch):
    """The stand-in core for every trace of a core; the list of modules traced."""
    traced = []

    def trace(module, inputs, dynamic_shapes, opset, output_names, translation_table=None):
        traced.append(module)
        return stand_in_core()

    monkeypatch.setattr(tracing, "onnx_graph", trace)
    # Not the traces this worker's session exports left (conftest exports within the block).
    monkeypatch.setattr(attention_function, "_traced", {})
    return traced


def small_model(**config):
    torch.manual_seed(0)
    model = MraModel(MraConfig(**{**ONE_LAYER_MODEL, "vocab_size": 100, **config})).eval()
    return patch_model(model, attention="reference")


def test_within_reusing_traces_a_core_is_traced_once_per_settings_shapes_dtypes_and_opset(
        traces):
    model = small_model()
    inputs = example_inputs(TASKS["feature-extraction"], model.config)
    with reusing_traces():
        # Each use gets a copy of its own. The core's constant is renamed when inlined, and
        # saving the model writes that name into the tensor's proto: a model parsed from the
        # cached proto shares it, and the next copy parsed then lacked its constant.
        for _ in range(3):
            layers = two_layer_graph()
            attention_function.inline(layers, attention_function.traced_core(model, inputs, 20))
            context, query = run(layers, batch=2, length=5)
            np.testing.assert_allclose(context, query + 2 * (BIAS + 5), rtol=1e-6)
        assert len(traces) == 1
        attention_function.traced_core(model, inputs, 19)
        attention_function.traced_core(small_model(block_per_row=4), inputs, 20)
        attention_function.traced_core(small_model().half(), inputs, 20)
        assert len(traces) == 4
    # Outside the block every export traces afresh: a tool may patch the attention in between.
    attention_function.traced_core(model, inputs, 20)
    assert len(traces) == 5


def test_layers_with_different_settings_are_refused_not_given_the_first_ones_core(traces):
    model = small_model(num_hidden_layers=2)
    attention_cores(model)[1].num_blocks //= 2  # a config gives every layer the same
    inputs = example_inputs(TASKS["feature-extraction"], model.config)
    with pytest.raises(RuntimeError, match="different MRA settings"):
        attention_function.traced_core(model, inputs, 20)
    assert traces == []
