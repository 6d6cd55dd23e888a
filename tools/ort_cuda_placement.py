#!/usr/bin/env python3
"""Where onnxruntime's CUDA provider will run a graph's nodes, and the copies between host and
device it will insert, predicted on a machine without a GPU (issue 25: the portable graph must
need none).

    python tools/ort_cuda_placement.py GRAPH.onnx [GRAPH.onnx ...]

onnxruntime gives a node to the CUDA provider where the provider has a kernel for the node's
types, then moves shape arithmetic back to the CPU (``GetCpuPreferredNodes``,
``onnxruntime/core/framework/fallback_cpu_capability.cc``): starting from the readers of tensors
a CUDA kernel leaves in host memory (Shape's and Size's outputs), a node goes to the CPU where
each input is such a host tensor, a graph input or an initializer of at most 100 elements, none
is fp16 or bf16, and none is one its CUDA kernel reads from host memory anyway; the readers of
its outputs are examined in turn. Wherever a tensor made on one side is read on the other,
onnxruntime inserts a Memcpy node, one a tensor and direction; the inputs a CUDA kernel reads
from host memory (Reshape's shape, TopK's k, Range's bounds...) take host tensors without one.

The tables hold what that needs for the operators mra-export's graphs use, as onnxruntime's CUDA
kernels register them at opset 20 (``docs/OperatorKernels.md``, and the kernels' own
``InputMemoryType``/``OutputMemoryType`` in 1.21 and on main); an operator outside them is
reported, not guessed. Checked once against a GPU: for tree 1e83435's graphs (one mra-base
layer, ``tools/ort_cuda_speed.py export``) it predicts the 8 copies that onnxruntime-gpu 1.31.1
inserted into the portable fp16 one on the H200 on 2026-12-04, and none in the graph with the op,
as there (``tools/results/gpu-h200.md``): the 8 are a Pad of int64 values, which has no CUDA
kernel, and shape arithmetic read by the attention's index computations. The GPU test in
``tests/test_ort_cuda_placement.py`` reads the real placement where a CUDA provider is.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from pathlib import Path
from typing import NamedTuple

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

FLOATS = frozenset({"FLOAT16", "FLOAT", "DOUBLE"})
NUMBERS = FLOATS | {"INT32", "INT64"}
ANY = NUMBERS | {"BOOL"}

# op type: (the input whose element type picks the kernel, the element types the CUDA provider
# has a kernel for), among the types mra-export's graphs use.
CUDA_KERNEL_TYPES = {
    **{op: (0, NUMBERS) for op in (
        "Abs", "Add", "CumSum", "Div", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Min",
        "Mod", "Mul", "Neg", "Pow", "ReduceMax", "ReduceSum", "Sign", "Sub", "TopK")},
    **{op: (0, FLOATS) for op in (
        "Exp", "Floor", "Gelu", "Gemm", "LayerNormalization", "MatMul", "Relu")},
    **{op: (0, ANY) for op in (
        "Cast", "Concat", "Equal", "Expand", "Gather", "Identity", "Reshape", "ScatterElements",
        "Shape", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze")},
    **{op: (0, frozenset({"BOOL"})) for op in ("And", "Not", "Or")},
    "Clip": (0, FLOATS | {"INT64"}),
    "Pad": (0, FLOATS | {"BOOL"}),
    "Range": (0, frozenset({"FLOAT", "DOUBLE", "INT32", "INT64"})),
    "Where": (1, NUMBERS),
    # mra-export's own op: libmra_attention_ort.so registers it for the CUDA provider too
    ("trt.plugins", "MraAttention"): (0, frozenset({"FLOAT16", "BFLOAT16", "FLOAT"})),
}
# The inputs each CUDA kernel reads from host memory (InputMemoryType OrtMemTypeCPUInput).
HOST_INPUTS = {
    "ConstantOfShape": {0}, "CumSum": {1}, "Expand": {1}, "Pad": {1, 2, 3}, "Range": {0, 1, 2},
    "ReduceMax": {1}, "ReduceSum": {1}, "Reshape": {1}, "Slice": {1, 2, 3, 4}, "Split": {1},
    "Squeeze": {1}, "Tile": {1}, "TopK": {1}, "Unsqueeze": {1},
}
# The outputs each CUDA kernel leaves in host memory.
HOST_OUTPUTS = {"Shape": {0}, "Size": {0}}
SMALL_INITIALIZER = 100  # elements: kSmallInitializerThreshold
NEVER_ON_CPU = {"FLOAT16", "BFLOAT16"}  # inputs of these types keep a node on the device


class Placement(NamedTuple):
    cpu_nodes: list[str]  # "OpType name" of the nodes onnxruntime will run on the CPU
    copies: list[dict]    # as tools/ort_cuda_speed.py's host_copies reads them from a session


class _Graph:
    """What the rule reads of a graph: nodes in order, element types, producers, readers."""

    def __init__(self, model: onnx.ModelProto):
        graph = _typed(model).graph
        self.nodes = list(graph.node)  # ONNX graphs are topologically sorted
        self.types = {name: TensorProto.DataType.Name(elem_type)
                      for name, elem_type in _element_types(graph).items()}
        self.small = {init.name for init in graph.initializer
                      if math.prod(init.dims) <= SMALL_INITIALIZER}
        self.inputs = {value.name for value in graph.input}
        self.producer = {out: k for k, node in enumerate(self.nodes) for out in node.output}
        self.readers: dict[str, list[int]] = {}
        for k, node in enumerate(self.nodes):
            for name in filter(None, node.input):
                self.readers.setdefault(name, []).append(k)

    def has_cuda_kernel(self, k: int) -> bool:
        node = self.nodes[k]
        key = node.op_type if node.domain in ("", "ai.onnx") else (node.domain, node.op_type)
        if key not in CUDA_KERNEL_TYPES:
            raise ValueError(f"{node.op_type} ({node.name}) is not in tools/ort_cuda_placement.py's"
                             " tables: add its CUDA kernel's types and host inputs from "
                             "onnxruntime's docs/OperatorKernels.md and its kernel registration")
        index, types = CUDA_KERNEL_TYPES[key]
        return self.types.get(node.input[index], "UNKNOWN") in types

    def output_on_host(self, k: int, name: str) -> bool:
        node = self.nodes[k]
        return list(node.output).index(name) in HOST_OUTPUTS.get(node.op_type, ())


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after onnx's shape inference, each ``MraAttention`` context typed as its query
    (the op's contract, plugins/README.md), as onnxruntime types it from the op library. onnx
    knows no schema for the op, and exports made with onnx 1.17 to 1.19 record no type for
    its output, so without this the nodes after it looked typeless, hence CPU-only. One pass a
    layer: a layer's query is typed only once the layer before it is."""
    while True:
        inferred = onnx.shape_inference.infer_shapes(model)
        graph = inferred.graph
        typed = _element_types(graph)
        contexts = {node.output[0]: typed[node.input[0]] for node in graph.node
                    if node.op_type == "MraAttention" and not typed.get(node.output[0])
                    and typed.get(node.input[0])}
        if not contexts:
            return inferred
        graph.value_info.extend(onnx.helper.make_tensor_value_info(name, elem_type, None)
                                for name, elem_type in contexts.items())
        model = inferred


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Each typed value's element type (0: unknown), initializers included."""
    types = {value.name: value.type.tensor_type.elem_type
             for value in (*graph.value_info, *graph.input, *graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def predict(model: onnx.ModelProto) -> Placement:
    """The CPU nodes and the copies onnxruntime's CUDA provider will make of ``model``."""
    g = _Graph(model)
    on_cuda = {k for k in range(len(g.nodes)) if g.has_cuda_kernel(k)}
    cpu_nodes = _cpu_preferred(g, on_cuda) | (set(range(len(g.nodes))) - on_cuda)
    names = [f"{g.nodes[k].op_type} {g.nodes[k].name}" for k in sorted(cpu_nodes)]
    return Placement(cpu_nodes=names, copies=_copies(g, cpu_nodes))


def _cpu_preferred(g: _Graph, on_cuda: set[int]) -> set[int]:
    """GetCpuPreferredNodes: the CUDA provider's nodes that go to the CPU."""
    host_tensors: set[str] = set()
    candidates: list[int] = []  # a heap: the earliest node first, as onnxruntime takes them

    def outputs_on_host(k: int, names) -> None:
        for name in names:
            host_tensors.add(name)
            for reader in g.readers.get(name, ()):
                heapq.heappush(candidates, reader)

    for k in on_cuda:
        outputs_on_host(k, [name for name in g.nodes[k].output if g.output_on_host(k, name)])
    visited, cpu = set(), set()
    while candidates:
        k = heapq.heappop(candidates)
        if k in visited:
            continue
        visited.add(k)
        if k not in on_cuda or _belongs_on_cpu(g, k, host_tensors):  # no CUDA kernel: the CPU's
            cpu.add(k)
            outputs_on_host(k, g.nodes[k].output)
    return cpu & on_cuda


def _belongs_on_cpu(g: _Graph, k: int, host_tensors: set[str]) -> bool:
    node = g.nodes[k]
    for index, name in enumerate(node.input):
        if not name:
            continue
        if g.types.get(name) in NEVER_ON_CPU:
            return False
        if name in g.small or name in g.inputs:
            continue
        if name not in host_tensors or index in HOST_INPUTS.get(node.op_type, ()):
            return False
    return True


def _copies(g: _Graph, cpu_nodes: set[int]) -> list[dict]:
    """One copy per tensor made on one side and read on the other (graph inputs and
    initializers are placed where they are read)."""
    copies: dict[tuple[str, str], dict] = {}
    for k, node in enumerate(g.nodes):
        for index, name in enumerate(node.input):
            made_by = g.producer.get(name)
            if made_by is None:
                continue
            made_on_host = made_by in cpu_nodes or g.output_on_host(made_by, name)
            read_on_host = k in cpu_nodes or index in HOST_INPUTS.get(node.op_type, ())
            if made_on_host == read_on_host:
                continue
            direction = "MemcpyToHost" if read_on_host else "MemcpyFromHost"
            maker = g.nodes[made_by]
            copy = copies.setdefault((direction, name), dict(
                copy=direction, tensor=name, made_by=f"{maker.op_type} {maker.name}", read_by=[]))
            copy["read_by"].append(f"{node.op_type} {node.name}")
    return list(copies.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, this script's folder
    from ort_cuda_speed import describe_copy

    for path in args.graphs:
        try:
            placement = predict(onnx.load(str(path), load_external_data=False))
        except (OSError, DecodeError, ValueError) as error:  # missing, not ONNX, outside the tables
            print(f"ort_cuda_placement: {path}: {error}", file=sys.stderr)
            return 2
        print(f"{path}: {len(placement.copies)} copies, "
              f"{len(placement.cpu_nodes)} nodes on the CPU")
        for copy in placement.copies:
            print(f"  {describe_copy(copy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
