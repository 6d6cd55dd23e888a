"""Where onnxruntime's CUDA provider places the portable graph's nodes, and what its kernels
cost there.

Every host-device crossing costs a Memcpy node and a synchronisation. The GPU test counts them
in the graph onnxruntime itself optimized and partitioned (``optimized_model_filepath``); the
CPU tests check the readers of tools/ort_cuda_speed.py, which lists them on a GPU machine, and
the shapes of the scans whose CUDA kernel costs the square of their length; and how the tool and
the bench time a graph there, its inputs and outputs bound on the device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mra_export.attention import SEGMENT_CHUNK
from mra_export.checkpoints import build_checkpoint
from mra_export.export import export_model
from mra_export.runtime.ort import (CPU, CUDA, CUDA_FP32, NO_CUDA_PROVIDER, default_options,
                                    device_binding)
from mra_export.tasks import TASKS

from .conftest import SEVERAL_CHUNKS_MODEL, SMALL_MODEL, load_tool, onnx_model


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason=NO_CUDA_PROVIDER)
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_the_cuda_provider_copies_nothing_between_host_and_device(tmp_path, dtype):
    """Shape arithmetic may stay on the CPU where it only feeds inputs the CUDA kernels take on
    the host (Reshape's shape, TopK's k, Range...); nothing else may: no Memcpy node."""
    task = TASKS["feature-extraction"]
    checkpoint = build_checkpoint(tmp_path / "checkpoint", task, **SMALL_MODEL)
    export_model(checkpoint, tmp_path / "export", task=task.name, flavour="portable", dtype=dtype,
                 log=lambda message: None)
    options = default_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), options, providers=[CUDA_FP32])
    tool = load_tool("ort_cuda_speed")
    copies = tool.host_copies(tmp_path / "optimized.onnx")
    assert not copies, "\n".join(map(tool.describe_copy, copies))


def _predicted(path: Path):
    return load_tool("ort_cuda_placement").predict(onnx.load(str(path), load_external_data=False))


def _assert_no_copy_predicted(placement) -> None:
    describe = load_tool("ort_cuda_speed").describe_copy
    assert not placement.copies, "\n".join(map(describe, placement.copies))
    assert any(node.startswith("Concat ") for node in placement.cpu_nodes), \
        "no shape arithmetic predicted on the CPU: the rule did not run"


@pytest.mark.slow
def test_every_heads_graphs_are_predicted_to_need_no_copy_on_the_cuda_provider(exports):
    """Here, without a GPU: onnxruntime's rule for what its CUDA provider leaves on the CPU
    (tools/ort_cuda_placement.py) replayed on each head's exports. For that day's graphs it
    predicted the 8 copies (portable) and none (with the op) the H200 run of 2026-12-04 found;
    the GPU test above checks the real placement."""
    for task in TASKS:
        _assert_no_copy_predicted(_predicted(exports[task, "portable"] / "model.onnx"))
        with_op = _predicted(exports[task, "plugin"] / "model.onnx")
        assert not with_op.copies and with_op.cpu_nodes
        assert not [node for node in with_op.cpu_nodes if node.startswith("MraAttention")]


@pytest.mark.slow
def test_a_plugin_graph_that_records_no_type_for_the_contexts_is_typed_as_onnxruntime_does(
        exports):
    """Exported with onnx 1.17 or 1.19 (found in a venv at the old lower bounds), the plugin graph
    has no type for MraAttention's output: the tool types it as the query, as onnxruntime does
    from the op library, instead of putting its readers on the CPU."""
    model = onnx.load(str(exports["text-classification", "plugin"] / "model.onnx"))
    typed = [value for value in model.graph.value_info
             if not value.name.startswith("attention_context")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(typed)
    placement = load_tool("ort_cuda_placement").predict(model)
    assert not placement.copies and placement.cpu_nodes


@pytest.mark.slow
def test_the_fp16_portable_graph_is_predicted_to_need_no_copy_on_the_cuda_provider(fp16_exports):
    """fp16 inputs keep a node on the device, which moves where the CPU's part ends."""
    _assert_no_copy_predicted(_predicted(fp16_exports[1]["portable"] / "model.onnx"))


def _graph(nodes, inputs, outputs, initializers=()):
    return onnx_model(helper.make_graph(nodes, "placed", inputs, outputs, list(initializers)))


def _product_graph():
    """One Einsum node named "product": an operator outside the placement tool's tables."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    return _graph([helper.make_node("Einsum", ["x", "x"], ["y"], name="product",
                                    equation="ij,jk->ik")],
                  [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])


def test_the_prediction_leaves_shape_arithmetic_on_the_cpu_and_copies_what_the_device_reads():
    """Shape's output lies in host memory; the Gather and Cast of it go to the CPU (inputs on the
    host or small initializers). Reshape takes its shape from the host; Mul reads the cast on the
    device: one copy. Exp of the graph input runs on the device (no host input to start from)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    model = _graph(
        [helper.make_node("Exp", ["x"], ["e"], name="exp"),
         helper.make_node("Shape", ["e"], ["shape"], name="shape"),
         helper.make_node("Gather", ["shape", "zero"], ["rows"], name="rows"),
         helper.make_node("Cast", ["rows"], ["scale"], name="cast", to=TensorProto.FLOAT),
         helper.make_node("Reshape", ["e", "shape"], ["same"], name="reshape"),
         helper.make_node("Mul", ["same", "scale"], ["y"], name="mul")],
        [x], [y], [helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    placement = load_tool("ort_cuda_placement").predict(model)
    assert placement.cpu_nodes == ["Gather rows", "Cast cast"]
    assert placement.copies == [dict(copy="MemcpyFromHost", tensor="scale", made_by="Cast cast",
                                     read_by=["Mul mul"])]


def test_the_prediction_puts_an_operator_without_a_cuda_kernel_for_its_type_between_two_copies():
    """The CUDA provider has no Pad of int64 values (the 2026-12-04 graph had two)."""
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [6])
    model = _graph(
        [helper.make_node("Abs", ["x"], ["a"], name="abs"),
         helper.make_node("Pad", ["a", "pads"], ["padded"], name="pad"),
         helper.make_node("Neg", ["padded"], ["y"], name="neg")],
        [x], [y], [helper.make_tensor("pads", TensorProto.INT64, [2], [1, 1])])
    placement = load_tool("ort_cuda_placement").predict(model)
    assert placement.cpu_nodes == ["Pad pad"]
    assert [(c["copy"], c["tensor"]) for c in placement.copies] == [
        ("MemcpyToHost", "a"), ("MemcpyFromHost", "padded")]


def test_the_prediction_names_an_operator_it_has_no_table_for():
    with pytest.raises(ValueError, match="Einsum .product. is not in"):
        load_tool("ort_cuda_placement").predict(_product_graph())


def test_the_gpu_report_sets_the_prediction_beside_the_copies_found(tmp_path):
    """tools/ort_cuda_speed.py run lists, for each graph, the copies found on the GPU and those
    predicted here, so a lent GPU checks the prediction; a graph the tables do not cover says so."""
    tool = load_tool("ort_cuda_speed")
    path = tmp_path / "product.onnx"
    onnx.save(_product_graph(), path)
    unknown = tool.predicted_copies(path)
    assert unknown.startswith("not predicted: Einsum (product) is not in")
    found = dict(copy="MemcpyFromHost", tensor="scale", made_by="Cast cast", read_by=["Mul mul"])
    lines = tool.placement_lines("mra-portable-fp16", dict(
        copies=[found], cpu_nodes=["Cast cast"], predicted=[tool.describe_copy(found)]))
    assert lines == [
        "- mra-portable-fp16: 1 Memcpy nodes, 1 nodes on the CPU provider",
        "  - MemcpyFromHost scale: made by Cast cast, read by Mul mul",
        "  - on the CPU: Cast cast",
        "  - predicted here (tools/ort_cuda_placement.py): 1 copies; MemcpyFromHost scale: made by "
        "Cast cast, read by Mul mul"]


def test_the_tool_names_each_copy_with_the_nodes_on_either_side(tmp_path):
    """A graph as onnxruntime saves it after placing a Pad on the CPU (the CUDA provider has no
    int64 Pad): one copy to the host, one back."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
         helper.make_node("MemcpyToHost", ["flat"], ["flat_on_host"], name="copy_1"),
         helper.make_node("Pad", ["flat_on_host", "pads"], ["padded"], name="pad"),
         helper.make_node("MemcpyFromHost", ["padded"], ["padded_on_device"], name="copy_2"),
         helper.make_node("Gather", ["table", "padded_on_device"], ["y"], name="gather")],
        "placed", [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [6])],
        [helper.make_tensor("shape", TensorProto.INT64, [1], [-1]),
         helper.make_tensor("pads", TensorProto.INT64, [2], [0, 2]),
         helper.make_tensor("table", TensorProto.INT64, [4], [5, 6, 7, 8])])
    onnx.save(helper.make_model(graph), tmp_path / "optimized.onnx")
    tool = load_tool("ort_cuda_speed")
    copies = tool.host_copies(tmp_path / "optimized.onnx")
    assert [tool.describe_copy(c) for c in copies] == [
        "MemcpyToHost flat: made by Reshape flatten, read by Pad pad",
        "MemcpyFromHost padded: made by Pad pad, read by Gather gather"]


def test_the_tool_reads_each_nodes_provider_from_onnxruntimes_profile(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
         helper.make_node("Reshape", ["x", "shape"], ["y"], name="same_shape")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = onnx_model(graph)
    options = default_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "tiny")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])
    session.run(None, {"x": np.zeros((2, 3), np.float32)})
    profile = Path(session.end_profiling())
    nodes = load_tool("ort_cuda_speed").cpu_provider_nodes(profile)
    assert nodes == ["Shape shape_of_x", "Reshape same_shape"]


def test_every_cumsum_of_the_portable_graph_scans_along_one_row(several_chunks_export, tmp_path):
    """onnxruntime's CUDA CumSum has each output element add up its whole prefix
    (``cumsum_impl.cu``): a scan of n costs n²/2 reads. So every scan of the portable graph runs
    along one (batch, head) row: its axis is as long at batch 3 as at batch 1, and no longer
    than a row's query blocks (nb) or its chunks of selected blocks. (At 4096 tokens and batch 8
    the scan over the whole batch's 6144 chunks came to 3.9e10 reads by that count.)"""
    path = several_chunks_export[1] / "model.onnx"
    length, per_row = (SEVERAL_CHUNKS_MODEL[key] for key in ("max_position_embeddings",
                                                             "block_per_row"))
    n_blocks = length // 32
    chunks = -(-min(n_blocks * per_row, n_blocks ** 2) // SEGMENT_CHUNK)
    scans = load_tool("ort_cuda_speed").cumsum_scans
    axes = {batch: {name: scan["axis"] for name, scan in scans(
        path, {"input_ids": np.ones((batch, length), np.int64),
               "attention_mask": np.ones((batch, length), np.int64)},
        tmp_path / f"batch{batch}").items()} for batch in (1, 3)}
    assert axes[1], "no CumSum profiled: the test reads nothing"
    assert axes[3] == axes[1]
    too_long = {name: n for name, n in axes[1].items() if n > max(n_blocks, chunks)}
    assert not too_long, f"scans longer than a row's {n_blocks} blocks: {too_long}"


def test_the_tool_counts_a_scans_reads_as_the_cuda_kernel_makes_them(tmp_path):
    """Each of the 3 lanes of a [3, 4] scan along axis 1 reads 1 + 2 + 3 + 4 elements."""
    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["y"], name="scan")],
        "scan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor("axis", TensorProto.INT64, [], [1])])
    path = tmp_path / "scan.onnx"
    onnx.save(onnx_model(graph), path)
    scans = load_tool("ort_cuda_speed").cumsum_scans(path, {"x": np.zeros((3, 4), np.float32)},
                                                     tmp_path / "scan")
    assert scans == {"scan": dict(shape=[3, 4], axis=4, reads=30)}


def test_the_tool_counts_the_bytes_a_graphs_nodes_move(tmp_path):
    """A Reshape moves nothing; a Gather of 2 of 4 rows of 3 floats reads its 2 indices (int64)
    and the 2 rows, and writes them; an Add reads both operands and writes its sum."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["table"], name="view"),
         helper.make_node("Gather", ["table", "rows"], ["picked"], name="gather"),
         helper.make_node("Add", ["picked", "picked"], ["y"], name="add")],
        "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [4, 3]),
         helper.make_tensor("rows", TensorProto.INT64, [2], [3, 0])])
    path = tmp_path / "moves.onnx"
    onnx.save(onnx_model(graph), path)
    tool = load_tool("ort_cuda_speed")
    nodes = tool.profiled_nodes(path, {"x": np.zeros(12, np.float32)}, tmp_path / "moves",
                                optimized=False)
    assert [node["op"] for node in nodes] == ["Reshape", "Gather", "Add"]
    assert tool.bytes_moved(nodes) == dict(nodes=3, moving=0, bytes=(16 + 2 * 24) + 3 * 24)


def _two_output_session(providers) -> ort.InferenceSession:
    """y = x + 1 and z = x * x, on ``providers``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"]), helper.make_node("Mul", ["x", "x"], ["z"])],
        "two_outputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n"]) for name in ("y", "z")],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = onnx_model(graph)
    return ort.InferenceSession(model.SerializeToString(), default_options(), providers=providers)


def _check_a_bound_run(providers, device: str) -> None:
    session = _two_output_session(providers)
    x = np.array([1.5, -2.0, 3.0], np.float32)
    binding = device_binding(session, {"x": x}, device)
    session.run_with_iobinding(binding)
    outputs = binding.get_outputs()
    assert [value.device_name() for value in outputs] == [device, device]
    y, z = binding.copy_outputs_to_cpu()
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(z, x * x)
    session.run_with_iobinding(binding)  # a binding serves every timed run
    for again, first in zip(binding.copy_outputs_to_cpu(), (y, z)):
        np.testing.assert_array_equal(again, first)


def test_a_bound_run_computes_every_output_and_leaves_it_where_it_was_bound():
    """``device_binding``, which the bench's onnxruntime-CUDA columns and
    tools/ort_cuda_speed.py time with: every output, in the session's order, and left on the
    device asked for (here the CPU's, which onnxruntime binds the same way)."""
    _check_a_bound_run([CPU], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason=NO_CUDA_PROVIDER)
def test_a_bound_run_on_the_cuda_provider_leaves_its_outputs_on_the_gpu():
    _check_a_bound_run([CUDA_FP32], "cuda")


def test_the_gpu_report_judges_the_graphs_on_their_bound_runs():
    """tools/ort_cuda_speed.py's tables: issue 25's portable / dense from the runs with inputs
    and outputs on the GPU, then the same replayed as CUDA graphs, then the runs from the host; a
    graph onnxruntime would not capture reads "refused", with its reason below, one not run so."""
    tool = load_tool("ort_cuda_speed")
    row = {"dtype": "fp16", "batch": 8, "mra-portable_ms": 9.0, "mra-op_ms": 7.0, "dense_ms": 12.0,
           "mra-portable_iobinding_ms": 3.0, "mra-op_iobinding_ms": 1.5,
           "dense_iobinding_ms": 6.0, "mra-portable_cudagraph_ms": 2.0,
           "mra-op_cudagraph_refused": "not captured: a kernel synchronized",
           "dense_cudagraph_ms": 5.0, "op_vs_portable_max_abs": 0.004,
           "memcpy_nodes": {"mra-portable": 0, "mra-op": 0, "dense": 0}}
    for timing in tool.TIMINGS:
        row.update(tool.ratios(row, timing))
    assert row["portable_over_dense_iobinding"] == pytest.approx(0.5)
    assert row["portable_over_dense_cudagraph"] == pytest.approx(0.4)
    assert row["portable_over_dense"] == pytest.approx(0.75)
    text = tool.markdown(dict(onnxruntime="1.31.1", rows=[row]))
    bound, captured, host = (part for part in text.split("\n\n") if part.startswith("| dtype"))
    assert bound.splitlines()[2] == ("| fp16 | 8 | 3.00 | 1.50 | 6.00 | 2.00x | 0.25x | 0.50x | "
                                     "4.0e-03 | 0, 0, 0 |")
    assert captured.splitlines()[2:] == [
        "| fp16 | 8 | 2.00 | refused | 5.00 | not run | not run | 0.40x |",
        "- mra-op, fp16, batch 8: not captured: a kernel synchronized"]
    assert host.splitlines()[2] == "| fp16 | 8 | 9.00 | 7.00 | 12.00 | 1.29x | 0.58x | 0.75x |"
    earlier = {key: value for key, value in row.items() if "dense" not in key}
    assert "| 3.00 | 1.50 | not run | 2.00x | not run | not run |" in tool.markdown(
        dict(onnxruntime="1.31.1", rows=[earlier]))


def test_a_replayed_run_binds_its_outputs_at_fixed_addresses_or_says_why_not():
    """What tools/ort_cuda_speed.py times as a CUDA graph, run here on the CPU provider (which
    captures nothing but binds the same way); a session onnxruntime refuses gives its line."""
    replayed_ms = load_tool("ort_cuda_speed").replayed_ms
    x = np.array([1.5, -2.0], np.float32)
    outputs = [((2,), np.float32)] * 2
    assert isinstance(replayed_ms(lambda: _two_output_session([CPU]), {"x": x}, outputs, "cpu"),
                      float)

    def refused():
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph "
                           "capture feature\nsecond line")
    assert replayed_ms(refused, {"x": x}, outputs, "cpu") == (
        "not captured: [ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture "
        "feature")


@pytest.mark.parametrize("argv,message", [
    (["scans", "{empty}"], "{empty} holds no graph; make them with 'export {empty}'"),
    (["run", "{empty}"], "{empty} holds no graph"),
    (["export", "{empty}", "--dtypes", "fp64"], "--dtypes takes fp16, fp32 or both, got fp64"),
])
def test_the_tools_bad_arguments_are_named_before_any_work(argv, message, tmp_path, capsys):
    tool = load_tool("ort_cuda_speed")
    with pytest.raises(SystemExit) as exit_info:
        tool.main([word.format(empty=tmp_path) for word in argv])
    assert exit_info.value.code == 2
    assert message.format(empty=tmp_path) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
