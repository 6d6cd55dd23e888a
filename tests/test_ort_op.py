"""``libmra_attention_ort.so``: the plugin flavour's MraAttention node as an onnxruntime custom op.

One-node graphs (built with onnx.helper) run by onnxruntime with the library registered, against
the PyTorch reference ``mra_attention``, float64 dense attention where every block is selected,
and the C++ twin called directly; then every head's plugin-flavour export through
``OrtMraModel``, the parity rows and the one-line refusals. The library compiles against
onnxruntime's C API headers only; where none are given (ORT_INCLUDE_DIR) it is skipped.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mra_export import native
from mra_export.attention import mra_attention
from mra_export.errors import UserError
from mra_export.kernel_check import compare_with_reference
from mra_export.parity import run_parity
from mra_export.parity.backends import export_backends
from mra_export.parity.inputs import parity_feeds
from mra_export.runtime.ort import CUDA, OrtMraModel, op_library_has_cuda_kernel
from mra_export.tasks import TASKS

from .conftest import onnx_model, random_qkv, ragged_mask
from .test_attention_dense import dense_attention_float64, normaliser_error_bound
from .test_export_onnxruntime import TOLERANCE as MODEL_TOLERANCE
from .test_export_onnxruntime import torch_outputs
from .test_plugin_build import configure_with_empty_folder

TOLERANCE = 1e-5  # float32, against the PyTorch reference (as the C++ twin's own tests)
ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE}
OP_ROWS = ("onnxruntime-cpu (MraAttention op)", "onnxruntime-cuda (MraAttention op)")


def ort_headers() -> Path | None:
    """The folder holding onnxruntime_c_api.h: ORT_INCLUDE_DIR, or the one the build folder was
    configured with (as plugins/CMakeLists.txt finds it), or None."""
    folders = [os.environ.get("ORT_INCLUDE_DIR", "")]
    cache = native.build_dir() / "CMakeCache.txt"
    if cache.is_file():
        folders += [line.split("=", 1)[1] for line in cache.read_text().splitlines()
                    if line.startswith("ORT_INCLUDE_DIR:")]
    found = [Path(f) for f in folders if f and (Path(f) / "onnxruntime_c_api.h").is_file()]
    return found[0] if found else None


@pytest.fixture(scope="session")
def op_library() -> Path:
    """The op library, built here if `make plugins` has not (it needs onnxruntime's headers)."""
    if native.unbuilt(native.ORT_OP_LIBRARY) and ort_headers() is None:
        pytest.skip("the onnxruntime op needs onnxruntime's C API headers to compile: set "
                    "ORT_INCLUDE_DIR (make test does where ../shared/third_party/onnxruntime/"
                    "include exists)")
    return native.ensure_built(native.ORT_OP_LIBRARY, "mra_attention_ort")


def attributes(num_blocks, mode="full", first=0, diagonal=0) -> dict:
    """An MraAttention node's attributes, as the exporter writes them."""
    return dict(num_blocks=num_blocks, approx_mode=mode, block_size=32,
                initial_prior_first_n_blocks=first, initial_prior_diagonal_n_blocks=diagonal)


def node_graph(dtype=torch.float32, key_dtype=None, value_dtype=None, **node_attributes) -> bytes:
    """One MraAttention node with float32 inputs and output, cast to and from ``dtype`` around
    it (numpy has no bfloat16): exact, as the values fed are ``dtype``'s already."""
    key_dtype = key_dtype or dtype
    value_dtype = value_dtype or dtype
    nodes, names = [], []
    for name, kind in (("query", dtype), ("key", key_dtype), ("value", value_dtype)):
        if kind == torch.float32:
            names.append(name)
        else:
            names.append(f"{name}.cast")
            nodes.append(helper.make_node("Cast", [name], [names[-1]], to=ONNX_TYPES[kind]))
    context = "context" if dtype == torch.float32 else "context.stored"
    nodes.append(helper.make_node("MraAttention", [*names, "mask"], [context], name="mra",
                                  domain="trt.plugins", plugin_version="1", plugin_namespace="",
                                  **node_attributes))
    if dtype != torch.float32:
        nodes.append(helper.make_node("Cast", [context], ["context"], to=TensorProto.FLOAT))
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
              for name in ("query", "key", "value")]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, None))
    graph = helper.make_graph(nodes, "mra", inputs,
                              [helper.make_tensor_value_info("context", TensorProto.FLOAT, None)])
    model = onnx_model(graph, {"": 17, "trt.plugins": 1})
    return model.SerializeToString()


def session(library, graph: bytes, provider="CPUExecutionProvider") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    if provider != "CPUExecutionProvider":  # the op must run there, not fall back to the CPU
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(graph, options, providers=[provider])


def run(sess, query, key, value, mask) -> torch.Tensor:
    feed = {name: t.float().numpy() for name, t in zip(("query", "key", "value"), (query, key, value))}
    feed["mask"] = (mask != 0).to(torch.int32).numpy()
    return torch.from_numpy(sess.run(None, feed)[0])


def op(library, query, key, value, mask, dtype=torch.float32, **node_attributes) -> torch.Tensor:
    return run(session(library, node_graph(dtype, **node_attributes)), query, key, value, mask)


CASES = [(seq_len, num_blocks, mode, priors)
         for seq_len in (1, 31, 100, 257) for num_blocks in (1, 16, 100)
         for mode, priors in (("full", (0, 0)), ("sparse", (2, 5)), ("full", (1, 3)))]


@pytest.mark.parametrize("seq_len,num_blocks,mode,priors", CASES)
def test_op_matches_pytorch_with_ragged_and_all_padding_masks(op_library, seq_len, num_blocks,
                                                              mode, priors):
    q, k, v = random_qkv(3, 2, seq_len, 32, seed=seq_len + num_blocks)
    mask = ragged_mask(3, seq_len, [seq_len, seq_len // 2, 0])  # the last sample is all padding
    settings = attributes(num_blocks, mode, *priors)
    ours = op(op_library, q, k, v, mask, **settings)
    assert ours.shape == q.shape
    assert (ours - mra_attention(q, k, v, mask, **settings)).abs().max().item() <= TOLERANCE
    assert not ours[2].any()  # masked queries are 0


@pytest.mark.parametrize("head_dim", [32, 64, 48])  # 48: the CPU twin takes what the kernels do not
@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_every_block_selected_is_dense_softmax(op_library, head_dim, mode):
    seq_len = 150
    blocks = math.ceil(seq_len / 32)
    q, k, v = random_qkv(2, 3, seq_len, head_dim, seed=head_dim)
    mask = ragged_mask(2, seq_len, [seq_len, 77])
    ours = op(op_library, q, k, v, mask, **attributes(blocks * blocks, mode))
    expected = dense_attention_float64(q, k, v, mask)
    assert ((ours.double() - expected).abs() <= normaliser_error_bound(q, k, v, mask)).all()


@pytest.mark.parametrize("dtype,ulp", [(torch.float32, 0.0), (torch.float16, 2**-10),
                                       (torch.bfloat16, 2**-7)])
def test_each_storage_type_is_the_cpu_twin_bit_for_bit(op_library, cpu_library, dtype, ulp):
    """One call per (batch, head) row on onnxruntime's threads gives the bits of one call over
    the whole problem, in each storage type; and that is the reference up to the output's
    rounding (kernel_check with the twin's selection, which is the op's: same bits)."""
    q, k, v = (t.to(dtype) for t in random_qkv(3, 4, 200, 64, seed=11))
    mask = ragged_mask(3, 200, [200, 131, 7])
    settings = attributes(10, "full", 1, 2)
    ours = op(op_library, q, k, v, mask, dtype, **settings)
    twin, selected = cpu_library.attention(q, k, v, mask, **settings)
    assert torch.equal(ours, twin.float())
    exact = mra_attention(q.float(), k.float(), v.float(), mask, **settings)
    assert ((ours - exact).abs() <= ulp * exact.abs() + TOLERANCE).all()
    comparison = compare_with_reference(twin, selected, q, k, v, mask, tolerance=TOLERANCE + ulp,
                                        relative=True, **settings)
    assert comparison.passed and comparison.same_blocks, comparison.summary()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_major_layout_is_the_head_major_result_transposed(op_library, dtype):
    """layout "bshd" (what the exporter writes): [batch, seq, heads, head_dim] in and out."""
    q, k, v = (t.to(dtype) for t in random_qkv(2, 3, 150, 64, seed=17))
    mask = ragged_mask(2, 150, [150, 61])
    settings = attributes(12, "full", 1, 3)
    head_major = op(op_library, q, k, v, mask, dtype, **settings)
    token_major = op(op_library, *(t.transpose(1, 2).contiguous() for t in (q, k, v)), mask, dtype,
                     layout="bshd", **settings)
    assert token_major.shape == (2, 150, 3, 64)
    assert torch.equal(token_major, head_major.transpose(1, 2))
    exact = mra_attention(q.float(), k.float(), v.float(), mask, **settings)
    assert (head_major - exact).abs().max() <= 2e-3 * exact.abs().max()


def test_one_session_serves_every_shape_and_an_empty_batch(op_library):
    sess = session(op_library, node_graph(**attributes(6, "sparse")))
    for batch, heads, seq_len in [(1, 1, 64), (2, 3, 33), (4, 2, 300)]:
        q, k, v = random_qkv(batch, heads, seq_len, 32, seed=seq_len)
        mask = ragged_mask(batch, seq_len, [seq_len - i for i in range(batch)])
        expected = mra_attention(q, k, v, mask, **attributes(6, "sparse"))
        assert (run(sess, q, k, v, mask) - expected).abs().max().item() <= TOLERANCE
    empty = torch.zeros(0, 2, 64, 32)
    assert run(sess, empty, empty, empty, torch.zeros(0, 64)).shape == (0, 2, 64, 32)


def test_absent_attributes_take_the_plugins_defaults(op_library):
    """A node that gives only num_blocks: approx_mode "full", block_size 32, no priors and
    layout "bhsd", as the plugin's fields default and as MraConfig does (mode "sparse" would
    drop the low-resolution term: a different result wherever a block is left out)."""
    q, k, v = random_qkv(2, 2, 160, 32, seed=13)
    mask = ragged_mask(2, 160, [160, 100])
    ours = op(op_library, q, k, v, mask, num_blocks=6)
    expected = mra_attention(q, k, v, mask, num_blocks=6, approx_mode="full")
    assert (ours - expected).abs().max().item() <= TOLERANCE


def refusal(library, graph: bytes, query, key, value, mask) -> str:
    with pytest.raises(Exception) as raised:  # onnxruntime's own exception types
        run(session(library, graph), query, key, value, mask)
    message = str(raised.value)
    assert "\n" not in message.strip()
    return message


def test_bad_inputs_are_refused_in_one_line_naming_the_problem(op_library):
    q, k, v = random_qkv(2, 2, 64, 32)
    mask = torch.ones(2, 64)
    graph = node_graph(**attributes(4))
    assert "MraAttention node 'mra': mask must be int32 [batch, seq] = [2, 64], got int32 [2, 63]" \
        in refusal(op_library, graph, q, k, v, mask[:, :63])
    assert "key must have query's shape [2, 2, 64, 32], got [2, 2, 64, 16]" \
        in refusal(op_library, graph, q, k[..., :16], v, mask)
    assert "value must have query's shape [2, 2, 64, 32], got [2, 2, 63, 32]" \
        in refusal(op_library, graph, q, k, v[:, :, :63], mask)
    assert "query must be [batch, heads, seq, head_dim], got shape [2, 64, 32]" \
        in refusal(op_library, graph, q[0], k[0], v[0], mask)
    assert ("query, key and value must share one type, float32, float16 or bfloat16 (got "
            "float32, float16, float32)") in refusal(op_library, node_graph(
                torch.float32, torch.float16, **attributes(4)), q, k, v, mask)
    # A value of another type than query and key would be read as query's type. (onnxruntime
    # types the op's output as its value, so the value is the graph's float32 here.)
    assert "(got float16, float16, float32)" in refusal(op_library, node_graph(
        torch.float16, value_dtype=torch.float32, **attributes(4)), q, k, v, mask)
    assert "(got float64, float64, float64)" in refusal(
        op_library, node_graph(torch.float64, **attributes(4)), q, k, v, mask)
    assert "attribute num_blocks must be an integer from 1 to 2^31-1, got 0" in refusal(
        op_library, node_graph(**attributes(0)), q, k, v, mask)
    # 2^32 + 4 would wrap around to a valid-looking 4 in int32.
    assert "attribute num_blocks must be an integer from 1 to 2^31-1, got 4294967300" in refusal(
        op_library, node_graph(**attributes(2**32 + 4)), q, k, v, mask)
    assert "attribute initial_prior_first_n_blocks must be an integer from 0 to 2^31-1, got -1" \
        in refusal(op_library, node_graph(**attributes(4, first=-1)), q, k, v, mask)
    assert "attribute initial_prior_diagonal_n_blocks must be an integer from 0 to 2^31-1, got -2" \
        in refusal(op_library, node_graph(**attributes(4, diagonal=-2)), q, k, v, mask)
    assert 'attribute approx_mode must be "full" or "sparse", got "dense"' in refusal(
        op_library, node_graph(**attributes(4, "dense")), q, k, v, mask)
    assert 'attribute layout must be "bhsd" or "bshd", got "sbhd"' in refusal(
        op_library, node_graph(layout="sbhd", **attributes(4)), q, k, v, mask)
    token_major = node_graph(layout="bshd", **attributes(4))
    assert "mask must be int32 [batch, seq] = [2, 64], got int32 [2, 2]" in refusal(
        op_library, token_major, *(t.transpose(1, 2) for t in (q, k, v)), mask[:, :2])
    assert "query must be [batch, seq, heads, head_dim], got shape [2, 64, 32]" in refusal(
        op_library, token_major, q[0], k[0], v[0], mask)


@pytest.mark.slow
@pytest.mark.parametrize("task_name", list(TASKS))
def test_every_heads_plugin_export_runs_on_onnxruntime_as_pytorch(op_library, small_checkpoints,
                                                                  exports, task_name):
    """The plugin-flavour file as it is: OrtMraModel registers the library itself."""
    task = TASKS[task_name]
    model = OrtMraModel.from_pretrained(exports[task_name, "plugin"], provider="CPUExecutionProvider")
    assert model.providers == ["CPUExecutionProvider"]
    for feed in parity_feeds(task, model.config)[::3]:
        got = model(**feed)
        expected = torch_outputs(small_checkpoints[task_name], task, feed)
        for name in task.outputs:
            assert np.abs(np.asarray(got[name]) - expected[name]).max() <= MODEL_TOLERANCE


def test_session_options_that_already_hold_the_library_are_named(op_library, exports):
    """onnxruntime's "Domain already set in registry" blamed the model; the options are the
    problem, and options this registered itself are reused (two models, one options object)."""
    from mra_export.errors import UserError

    held = ort.SessionOptions()
    held.register_custom_ops_library(str(op_library))
    with pytest.raises(UserError, match="session_options already held the MraAttention op "
                                        "library .*; pass new SessionOptions"):
        OrtMraModel.from_pretrained(exports["fill-mask", "plugin"], provider="CPUExecutionProvider",
                                    session_options=held)
    shared = ort.SessionOptions()
    for _ in range(2):
        OrtMraModel.from_pretrained(exports["fill-mask", "plugin"], provider="CPUExecutionProvider",
                                    session_options=shared)


@pytest.mark.slow
def test_parity_adds_the_op_rows_and_says_why_cuda_is_skipped(op_library, small_checkpoints,
                                                              exports):
    report = run_parity(small_checkpoints["fill-mask"], [exports["fill-mask", "plugin"]],
                        log=lambda m: None).to_dict()
    rows = {b["backend"]: b for b in report["backends"]}
    assert report["passed"] and rows[OP_ROWS[0]]["status"] == "passed"
    assert max(o["max_abs"] for o in rows[OP_ROWS[0]]["outputs"].values()) <= 1e-4
    assert rows[OP_ROWS[0]]["attention"]["max_abs"] <= 1e-4  # every head, every layer
    if CUDA not in ort.get_available_providers():
        assert rows[OP_ROWS[1]]["status"] == "skipped"
        assert "no CUDAExecutionProvider" in rows[OP_ROWS[1]]["reason"]
    elif not op_library_has_cuda_kernel():
        assert "built without its CUDA kernel" in rows[OP_ROWS[1]]["reason"]
    else:  # a GPU machine with onnxruntime-gpu
        assert rows[OP_ROWS[1]]["status"] == "passed"


@pytest.mark.slow
def test_without_the_library_a_plugin_export_names_make_plugins(exports, tmp_path, monkeypatch):
    monkeypatch.setenv("MRA_EXPORT_PLUGIN_BUILD", str(tmp_path))  # an empty build folder
    exported = exports["fill-mask", "plugin"]
    with pytest.raises(UserError, match=r"libmra_attention_ort\.so is not built, and onnxruntime "
                                        r"runs the plugin flavour's MraAttention nodes through "
                                        r"it: run 'make plugins ORT_INCLUDE_DIR="):
        OrtMraModel.from_pretrained(exported, provider="CPUExecutionProvider")
    rows = {b.name: b for b in export_backends(exported)}
    for name in OP_ROWS:
        assert rows[name].load is None and "make plugins ORT_INCLUDE_DIR=" in rows[name].skipped
    (tmp_path / native.ORT_OP_LIBRARY).write_bytes(b"not a library")
    with pytest.raises(UserError, match=r"onnxruntime .* cannot load .*libmra_attention_ort\.so "
                                        r"\(.*\); it needs onnxruntime 1\.20 or later"):
        OrtMraModel.from_pretrained(exported, provider="CPUExecutionProvider")


def test_a_folder_without_onnxruntime_headers_is_named_when_configuring(tmp_path):
    """`make plugins ORT_INCLUDE_DIR=<wrong folder>` says where it looked; there is no target."""
    wrong, result = configure_with_empty_folder(tmp_path, "onnxruntime-headers", "ORT_INCLUDE_DIR",
                                                ("ORT_INCLUDE_DIR",))
    if "+ mra_attention_ort (" in result.stdout:
        pytest.skip("onnxruntime's headers are installed in a system folder, which CMake finds anyway")
    assert f"SKIPPED mra_attention_ort: no onnxruntime_c_api.h in {wrong}" in result.stdout
    assert "the onnxruntime op is not built" in " ".join(result.stderr.split())  # the warning
    targets = subprocess.run(["cmake", "--build", str(tmp_path / "build"), "--target", "help"],
                             capture_output=True, text=True, timeout=120).stdout
    assert "mra_attention_cpu" in targets and "mra_attention_ort" not in targets


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_cuda_kernel_on_onnxruntimes_stream(op_library, dtype, tolerance):
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    if not op_library_has_cuda_kernel():
        pytest.skip(f"{op_library} was built without its CUDA kernel (no nvcc)")
    q, k, v = (t.to(dtype) for t in random_qkv(2, 3, 300, 64, seed=3))
    mask = ragged_mask(2, 300, [300, 123])
    settings = attributes(12, "full", 1, 2)
    ours = run(session(op_library, node_graph(dtype, **settings), CUDA), q, k, v, mask)
    expected = mra_attention(q.float(), k.float(), v.float(), mask, **settings)
    assert (ours - expected).abs().max().item() <= tolerance
    q96 = torch.randn(1, 1, 64, 96)
    with pytest.raises(Exception, match="head_dim 96 is not supported by the CUDA kernels"):
        run(session(op_library, node_graph(**settings), CUDA), q96, q96, q96, torch.ones(1, 64))
