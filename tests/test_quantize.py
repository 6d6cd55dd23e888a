"""``mra-export quantize``: int8 exports for onnxruntime's CPU, what got quantized, how parity
judges them (task agreement), and bad input.

The main model has the demo's weight scale (checkpoints.DEFAULT_CONFIG, initializer_range 0.02):
the conftest's SMALL_MODEL weights are 5x that, which int8 moves enough to flip near-tied answers
of a random model (measured: 93.75% end-argmax agreement for its question-answering head).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mra_export.bench import report as bench_report
from mra_export.checkpoints import build_checkpoint, load_config, load_model
from mra_export.cli import main
from mra_export.errors import UserError
from mra_export.export import ExportInfo, export_model
from mra_export.export import quantize as quantize_module
from mra_export.export.exporter import example_inputs
from mra_export.export.quantize import quantize_export
from mra_export.parity import agreement
from mra_export.parity.agreement import (
    AGREEMENT_THRESHOLD,
    COSINE_THRESHOLD,
    argmax_agreement,
    cosine_agreement,
    task_agreement,
)
from mra_export.parity.inputs import parity_feeds
from mra_export.patching import patch_model
from mra_export.runtime.ort import OrtMraModel
from mra_export.tasks import TASKS

from .conftest import cut_short_and_resigned

pytestmark = pytest.mark.slow

QA = TASKS["question-answering"]
# int8 outputs against the float32 PyTorch model: within 1% of the output's largest magnitude
# (measured on these weights: 0.11-0.13% for every head), and more than float rounding apart.
QUANTIZATION_TOLERANCE = 0.01
FLOAT_ROUNDING = 1e-5  # relative; the fp32 export is within 1e-6 of PyTorch


def silent(message):
    pass


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """A question-answering checkpoint at the demo's weight scale, its fp32 portable export and
    that quantized by the CLI: {"checkpoint", "fp32", "int8"}."""
    root = tmp_path_factory.mktemp("quantize")
    checkpoint = build_checkpoint(root / "checkpoint", QA)
    export_model(checkpoint, root / "fp32", task=QA.name, log=silent)
    assert main(["quantize", "--onnx", str(root / "fp32"), "--out", str(root / "int8")]) == 0
    return {"checkpoint": checkpoint, "fp32": root / "fp32", "int8": root / "int8"}


def graph(folder):
    return onnx.load(str(folder / "model.onnx"))


def test_the_encoder_weight_matmuls_are_int8_as_recorded(qa):
    info = ExportInfo.load(qa["int8"])
    assert info.dtype == "int8" and info.flavour == "portable"
    recorded = info.quantization
    assert recorded["onnxruntime"] == ort.__version__ == info.versions["onnxruntime"]
    assert recorded["scheme"] == "dynamic"
    info.verify_files(qa["int8"])  # the checksums are the quantized graph's
    fp32, int8 = graph(qa["fp32"]), graph(qa["int8"])
    initializers = {t.name for t in fp32.graph.initializer}
    matmuls = [n for n in fp32.graph.node if n.op_type == "MatMul"]
    with_weights = [n.name for n in matmuls if n.input[1] in initializers]
    layers = ExportInfo.load(qa["fp32"]).attention["layers"]
    # six per encoder layer, in the order the model runs them; the head's one comes last
    assert recorded["nodes"] == with_weights[:6 * layers] and len(with_weights) == 6 * layers + 1
    int8_weights = {t.name: t for t in int8.graph.initializer
                    if t.data_type == onnx.TensorProto.INT8}
    integer = {n.name: n for n in int8.graph.node if n.op_type == "MatMulInteger"}
    assert sorted(integer) == sorted(f"{name}_quant" for name in recorded["nodes"])
    for node in integer.values():  # symmetric int8 weights, one zero point per output channel
        weight, zero_point = int8_weights[node.input[1]], int8_weights[node.input[3]]
        assert list(zero_point.dims) == [weight.dims[1]]
        assert not onnx.numpy_helper.to_array(zero_point).any()
    float_left = {n.name for n in int8.graph.node if n.op_type == "MatMul"}
    assert not float_left & set(recorded["nodes"])
    assert sorted(recorded["float_matmuls"]) == sorted(
        {n.name for n in matmuls} - set(recorded["nodes"]))


def test_export_json_records_the_largest_int8_difference_over_every_output(qa):
    """export.json's validation is the int8 graph against the fp32 export on its sample, the
    largest difference over all the head's outputs (QA: both ends), recomputed here."""
    validation = ExportInfo.load(qa["int8"]).validation
    sample = example_inputs(QA, load_config(qa["checkpoint"]), batch=validation["batch"],
                            seq_len=validation["sequence_length"], seed=1)
    feed = {name: tensor.numpy() for name, tensor in sample.items()}
    runs = [ort.InferenceSession(str(qa[kind] / "model.onnx"), providers=["CPUExecutionProvider"])
            .run(list(QA.outputs), feed) for kind in ("int8", "fp32")]
    per_output = [float(np.abs(int8 - fp32).max()) for int8, fp32 in zip(*runs)]
    assert validation["max_abs_vs_fp32_export"] == pytest.approx(max(per_output), rel=1e-6)


def test_the_attention_and_every_other_node_stay_float(qa):
    """Every node of the fp32 graph but the quantized MatMuls is in the int8 graph unchanged
    (same op, inputs and outputs): the attention's block products, its TopK selection, sums
    and scatters; and no int8 tensor reaches any node but a MatMulInteger."""
    fp32, int8 = graph(qa["fp32"]), graph(qa["int8"])
    quantized = set(ExportInfo.load(qa["int8"]).quantization["nodes"])
    after = {n.name: n for n in int8.graph.node}
    kept = [n for n in fp32.graph.node if n.name not in quantized]
    attention = [n for n in kept if n.op_type in ("TopK", "ScatterElements", "CumSum")]
    assert attention and all(n.name in after for n in kept)
    for node in kept:
        twin = after[node.name]
        assert (twin.op_type, list(twin.input), list(twin.output)) == (
            node.op_type, list(node.input), list(node.output))
    int8_tensors = {t.name for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    readers = {n.op_type for n in int8.graph.node if int8_tensors & set(n.input)}
    assert readers == {"MatMulInteger"}
    outputs = {o.name: o.type.tensor_type.elem_type for o in int8.graph.output}
    assert outputs == {name: onnx.TensorProto.FLOAT for name in QA.outputs}


def test_a_quantizer_that_rewrites_an_attention_matmul_is_refused(qa, tmp_path, monkeypatch):
    """The attention's block products must stay float MatMuls: where onnxruntime's quantizer
    (another version of it) rewrites one as well as the chosen ones, quantize says so."""
    quantize_for_real = quantize_module._quantize
    source = qa["fp32"] / "model.onnx"
    attention_matmul = quantize_module.split_matmuls(onnx.load(str(source)))[1][0]

    def quantize_and_rewrite_one_more(source, target, nodes, *options):
        quantize_for_real(source, target, nodes, *options)
        model = onnx.load(str(target))
        node = next(n for n in model.graph.node if n.name == attention_matmul)
        node.name = f"{attention_matmul}_rewritten"
        onnx.save(model, str(target))

    monkeypatch.setattr(quantize_module, "_quantize", quantize_and_rewrite_one_more)
    layers = ExportInfo.load(qa["fp32"]).attention["layers"]
    changed = re.escape(f"attention MatMuls changed: ['{attention_matmul}']")
    with pytest.raises(UserError, match=changed):
        quantize_module.quantize_graph(source, tmp_path / "model.onnx", layers)


def int8_weights_of_matmuls(folder) -> list[np.ndarray]:
    model = graph(folder)
    weights = {t.name: t for t in model.graph.initializer}
    return [onnx.numpy_helper.to_array(weights[node.input[1]]).astype(np.int32)
            for node in model.graph.node if node.op_type == "MatMulInteger"]


def largest_int8_weight(folder) -> int:
    return max(int(np.abs(weight).max()) for weight in int8_weights_of_matmuls(folder))


@pytest.mark.parametrize("version,fix", [
    ("1.31.1", "onnxruntime 1.31.1's quantizer fails on graphs with a Gemm (the task heads'): "
               "pip install --upgrade 'onnxruntime>=1.32'"),
    ("1.32.0", "please report this")])
def test_a_quantizer_failure_names_the_fix_where_onnxruntime_is_too_old(
        qa, tmp_path, monkeypatch, capsys, version, fix):
    """onnxruntime 1.20.1 to 1.31.1 failed in quantize_dynamic on a text-classification export
    (a Gemm head) with this error; stood in for here, the library's own failure."""
    import onnxruntime.quantization

    def quantizer_of_old(*args, **kwargs):
        raise RuntimeError("[ShapeInferenceError] Inferred shape and existing shape differ in "
                           "dimension 0: (128) vs (3)")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", quantizer_of_old)
    monkeypatch.setattr(quantize_module.ort, "__version__", version)
    assert main(["quantize", "--onnx", str(qa["fp32"]), "--out", str(tmp_path / "int8")]) == 2
    assert capsys.readouterr().err == (
        f"mra-export quantize: error: onnxruntime could not quantize {qa['fp32'] / 'model.onnx'}: "
        "[ShapeInferenceError] Inferred shape and existing shape differ in dimension 0: (128) vs "
        f"(3); {fix}\n")
    assert not (tmp_path / "int8").exists()


def test_reduce_range_gives_7_bit_weights_and_is_recorded(qa, tmp_path, monkeypatch, capsys):
    """--reduce-range: onnxruntime's 7-bit weights (-64..64), for CPUs without VNNI, recorded in
    export.json; without it the weights use the full 8 bits. No note where it is asked for."""
    monkeypatch.setattr(quantize_module, "cpu_without_vnni", lambda: True)
    capsys.readouterr()
    out = tmp_path / "int8-7bit"
    assert main(["quantize", "--onnx", str(qa["fp32"]), "--out", str(out), "--reduce-range"]) == 0
    assert "VNNI" not in capsys.readouterr().err
    reduced, full = (ExportInfo.load(folder).quantization for folder in (out, qa["int8"]))
    assert reduced["reduce_range"] is True and "7-bit range" in reduced["weights"]
    assert full["reduce_range"] is False and "full 8-bit range" in full["weights"]
    assert largest_int8_weight(out) == 64 and largest_int8_weight(qa["int8"]) == 127
    assert len(int8_weights_of_matmuls(out)) == len(reduced["nodes"])


@pytest.mark.parametrize("without_vnni", [True, False])
def test_quantize_notes_reduce_range_on_a_cpu_without_vnni(qa, tmp_path, monkeypatch, capsys,
                                                           without_vnni):
    monkeypatch.setattr(quantize_module, "cpu_without_vnni", lambda: without_vnni)
    capsys.readouterr()
    assert main(["quantize", "--onnx", str(qa["fp32"]), "--out", str(tmp_path / "int8")]) == 0
    captured = capsys.readouterr()
    noted = "note: this CPU has no VNNI" in captured.err and "--reduce-range" in captured.err
    assert noted == without_vnni and "VNNI" not in captured.out


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx avx2 fma", True),  # AMD Zen 3, Intel Haswell to Skylake
    ("avx2 avx512f avx512_vnni", False),  # Cascade Lake and later, Zen 4
    ("avx2 avx_vnni", False),  # Alder Lake
    ("sse2 avx", False),  # no AVX2: onnxruntime's int8 kernels are another path there
])
def test_cpu_without_vnni_reads_linux_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nflags\t\t: {flags}\n")
    assert quantize_module.cpu_without_vnni(cpuinfo) is expected


def test_cpu_without_vnni_is_false_where_linux_lists_no_x86_flags(tmp_path):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert not quantize_module.cpu_without_vnni(arm)
    assert not quantize_module.cpu_without_vnni(tmp_path / "missing")


def test_int8_outputs_are_within_the_quantization_tolerance_of_pytorch(qa):
    model = OrtMraModel.from_pretrained(qa["int8"])
    assert model.providers == ["CPUExecutionProvider"]  # by default, whatever this onnxruntime has
    reference = patch_model(load_model(qa["checkpoint"], QA)[0])
    inputs = example_inputs(QA, reference.config, batch=3, seq_len=300, seed=5)
    with torch.no_grad():
        expected = reference(**inputs)
    got = model(**inputs)
    for name in QA.outputs:
        scale = float(expected[name].abs().max())
        error = float((torch.as_tensor(got[name]) - expected[name]).abs().max())
        assert FLOAT_ROUNDING * scale < error <= QUANTIZATION_TOLERANCE * scale, name


def recomputed_agreement(checkpoint, int8_folder):
    """Start and end argmax agreement over the parity inputs, computed here with torch."""
    reference = patch_model(load_model(checkpoint, QA)[0])
    model = OrtMraModel.from_pretrained(int8_folder)
    agree = {"start_logits": 0, "end_logits": 0}
    total = 0
    for feed in parity_feeds(QA, reference.config):
        inputs = {name: torch.from_numpy(array) for name, array in feed.items()}
        with torch.no_grad():
            expected = reference(**inputs)
        got = model(**inputs)
        real = inputs["attention_mask"].bool()
        for name in agree:
            want = expected[name].masked_fill(~real, float("-inf")).argmax(-1)
            have = torch.as_tensor(got[name]).masked_fill(~real, float("-inf")).argmax(-1)
            agree[name] += int((want == have).sum())
        total += real.shape[0]
    return {name: count / total for name, count in agree.items()}, total


def test_parity_judges_int8_by_task_agreement_and_float_backends_as_before(qa, capsys):
    code = main(["parity", "--model", str(qa["checkpoint"]), "--onnx", str(qa["fp32"]),
                 "--onnx", str(qa["int8"]), "--report", str(qa["int8"].parent / "report.json")])
    printed = capsys.readouterr().out
    data = json.loads((qa["int8"].parent / "report.json").read_text())
    backends = {b["backend"]: b for b in data["backends"]}
    fp32, int8 = backends["onnxruntime-cpu"], backends["onnxruntime-cpu [int8]"]
    # the fp32 export: tolerance 1e-4 on every output and the per-head diagnostic, as before
    assert fp32["status"] == "passed" and "agreement" not in fp32
    assert {o["tolerance"] for o in fp32["outputs"].values()} == {1e-4}
    assert fp32["attention"]["max_abs"] <= 1e-4
    # int8: errors reported, not judged; the task's agreement judges
    assert {o["tolerance"] for o in int8["outputs"].values()} == {None}
    assert all(o["max_abs"] > 1e-5 for o in int8["outputs"].values())
    expected, sequences = recomputed_agreement(qa["checkpoint"], qa["int8"])
    assert [a["metric"] for a in int8["agreement"]] == ["start argmax", "end argmax"]
    for entry, name in zip(int8["agreement"], ("start_logits", "end_logits")):
        assert entry["value"] == pytest.approx(expected[name])
        assert entry["count"] == sequences == 16 and entry["threshold"] == AGREEMENT_THRESHOLD
        assert entry["passed"] == (entry["value"] > AGREEMENT_THRESHOLD)
    assert int8["status"] == ("passed" if all(a["passed"] for a in int8["agreement"]) else "failed")
    assert int8["status"] == "passed"  # measured: 16 of 16 for both, at these weights
    assert backends["onnxruntime-cuda [int8]"]["status"] == "skipped"
    assert "CPU provider only" in backends["onnxruntime-cuda [int8]"]["reason"]
    assert code == 0 and "start argmax" in printed and "PASSED" in printed


def test_a_head_below_the_threshold_fails(qa, monkeypatch, capsys):
    """Nothing agrees above 100%: with that threshold the same int8 export fails, and says so."""
    monkeypatch.setattr(agreement, "AGREEMENT_THRESHOLD", 1.0)
    code = main(["parity", "--model", str(qa["checkpoint"]), "--onnx", str(qa["int8"])])
    printed = capsys.readouterr().out
    assert code == 1 and printed.rstrip().endswith("FAILED")
    assert "FAIL: 100.00% of 16 sequences agree (> 100%)" in printed


def test_argmax_agreement_on_a_hand_made_case():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    flipped = scores.copy()
    flipped[1] = [0.4, 0.5, 0.1]  # argmax 0 -> 1; PyTorch's margin there 0.1
    result = argmax_agreement([scores], [flipped], [None], "argmax label", "sequences")
    assert (result.value, result.count) == (0.75, 4) and not result.passed
    assert result.widest_flipped_margin == pytest.approx(0.1)
    same = argmax_agreement([scores], [scores + 0.01], [None], "argmax label", "sequences")
    assert (same.value, same.passed, same.widest_flipped_margin) == (1.0, True, None)
    # 99 of 100 is not above 99%: the threshold is strict
    many = np.tile(scores[:1], (100, 1))
    one_off = many.copy()
    one_off[7] = [1.0, 0.0, 0.0]
    assert argmax_agreement([many], [one_off], [None], "l", "s").value == 0.99
    assert not argmax_agreement([many], [one_off], [None], "l", "s").passed


def test_per_token_and_span_agreement_count_real_tokens_only():
    expected = np.array([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])  # [1, 4 tokens, 2]
    actual = expected.copy()
    actual[0, 1] = [0.0, 1.0]  # a real token flipped
    actual[0, 3] = [0.0, 1.0]  # a padded token flipped: not counted
    mask = np.array([[1, 1, 1, 0]])
    (tokens,) = task_agreement("token-classification", [{"logits": expected}],
                               [{"logits": actual}], [mask])
    assert (tokens.metric, tokens.value, tokens.count) == ("per-token argmax", 2 / 3, 3)
    start = np.array([[0.1, 0.9, 0.2, 5.0], [0.1, 0.2, 0.9, 5.0]])  # padding holds the maximum
    end = np.array([[0.9, 0.1, 0.2, 0.0], [0.9, 0.1, 0.2, 0.0]])
    moved_end = end.copy()
    moved_end[1] = [0.1, 0.1, 0.9, 0.0]
    masks = [np.array([[1, 1, 1, 0], [1, 1, 1, 0]])]
    results = task_agreement("question-answering",
                             [{"start_logits": start, "end_logits": end}],
                             [{"start_logits": start, "end_logits": moved_end}], masks)
    assert [(r.metric, r.value, r.count) for r in results] == [("start argmax", 1.0, 2),
                                                               ("end argmax", 0.5, 2)]


def test_cosine_agreement_is_the_smallest_over_real_tokens():
    angle = 0.05  # cos(0.05) = 0.99875: below 0.999
    expected = np.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    actual = np.array([[[np.cos(angle), np.sin(angle)], [0.0, 3.0], [-1.0, 0.0]]])
    mask = np.array([[1, 1, 0]])  # the opposite third vector is padding
    (result,) = task_agreement("feature-extraction", [{"last_hidden_state": expected}],
                               [{"last_hidden_state": actual}], [mask])
    assert result.value == pytest.approx(np.cos(angle)) and result.count == 2
    assert result.mean == pytest.approx((np.cos(angle) + 1.0) / 2)
    assert result.threshold == COSINE_THRESHOLD and not result.passed
    close = cosine_agreement([expected], [expected * 1.5], [np.ones((1, 3))])
    assert close.value == pytest.approx(1.0) and close.passed


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".previous-" in p.name]


def quantize_error(capsys, source, out) -> str:
    assert main(["quantize", "--onnx", str(source), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mra-export quantize: error: ")
    assert not out.exists() and not no_leftovers(out.parent)
    return lines[0]


def test_a_plugin_or_quantized_export_is_refused_in_one_line(qa, exports, tmp_path, capsys):
    plugin = quantize_error(capsys, exports["question-answering", "plugin"], tmp_path / "a")
    assert "is a plugin-flavour export" in plugin and "--flavour portable" in plugin
    again = quantize_error(capsys, qa["int8"], tmp_path / "b")
    assert f"is already quantized (int8); quantize the fp32 export it was made from " \
           f"({qa['fp32'].absolute()})" in again


def test_fp16_weights_are_refused_in_one_line(fp16_exports, tmp_path, capsys):
    message = quantize_error(capsys, fp16_exports[1]["portable"], tmp_path / "out")
    assert "has fp16 weights" in message and "--dtype fp32" in message


def test_a_missing_or_corrupt_export_is_refused_in_one_line(qa, tmp_path, capsys):
    assert "does not exist" in quantize_error(capsys, tmp_path / "missing", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert "has no export.json" in quantize_error(capsys, tmp_path / "empty", tmp_path / "b")
    changed = shutil.copytree(qa["fp32"], tmp_path / "changed")
    with open(changed / "model.onnx", "r+b") as model:
        model.seek(-1, 2)
        last = model.read(1)
        model.seek(-1, 2)
        model.write(bytes([last[0] ^ 1]))
    assert "does not match the sha256" in quantize_error(capsys, changed, tmp_path / "c")
    broken = shutil.copytree(qa["fp32"], tmp_path / "broken")
    (broken / "export.json").write_text("{not json")
    assert "export.json is corrupt" in quantize_error(capsys, broken, tmp_path / "d")
    for edit, problem in [({}, "attention's layers is None, not a whole number >= 1"),
                          ({"layers": "2"}, "attention's layers is '2', not a whole number >= 1")]:
        sizes = shutil.copytree(qa["fp32"], tmp_path / f"sizes{len(edit)}")
        record = json.loads((sizes / "export.json").read_text())
        record["attention"] = {**record["attention"], **edit} if edit else {}
        (sizes / "export.json").write_text(json.dumps(record))
        assert f"export.json is corrupt ({problem})" in quantize_error(capsys, sizes, tmp_path / "e")
    # A graph cut short whose checksum was written anew passes the checksum, not the reading.
    resigned = cut_short_and_resigned(qa["fp32"], tmp_path / "resigned")
    message = quantize_error(capsys, resigned, tmp_path / "f")
    assert "resigned/model.onnx is not a readable ONNX graph" in message and "export the model again" in message
    assert not (tmp_path / "f").exists()


def test_export_and_quantize_do_not_replace_each_others_output(qa, tmp_path, capsys):
    """Both write export.json: an fp32 export is not an earlier output of quantize, nor an int8
    one of export."""
    fp32 = shutil.copytree(qa["fp32"], tmp_path / "fp32")
    before = (fp32 / "export.json").read_text()
    assert main(["quantize", "--onnx", str(qa["fp32"]), "--out", str(fp32)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mra-export quantize: error: {fp32} is an output of 'mra-export export' (fp32), which this "
        "command does not replace; choose another output folder")
    assert (fp32 / "export.json").read_text() == before
    int8 = shutil.copytree(qa["int8"], tmp_path / "int8")
    with pytest.raises(UserError, match="int8 is an output of 'mra-export quantize' \\(int8\\), which "
                                        "this command does not replace"):
        export_model(qa["checkpoint"], int8, task=QA.name, log=silent)
    assert (int8 / "export.json").read_text() == (qa["int8"] / "export.json").read_text()


def test_a_failure_part_way_leaves_nothing_and_keeps_an_earlier_output(qa, tmp_path,
                                                                      monkeypatch):
    earlier = shutil.copytree(qa["int8"], tmp_path / "earlier")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}

    def fail(*args):
        raise UserError("stopped after quantizing")

    monkeypatch.setattr(quantize_module, "_validate", fail)
    for out in (earlier, tmp_path / "new"):
        with pytest.raises(UserError, match="stopped after quantizing"):
            quantize_export(qa["fp32"], out, log=silent)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert not (tmp_path / "new").exists() and not no_leftovers(tmp_path)


def test_the_cuda_provider_is_refused_for_int8_in_one_line(qa):
    for provider in ("CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        with pytest.raises(UserError, match="^this export is int8: onnxruntime computes its "
                                            "dynamically quantized MatMuls on the CPU provider "
                                            "only; use provider='CPUExecutionProvider'") as error:
            OrtMraModel.from_pretrained(qa["int8"], provider=provider)
        assert "\n" not in str(error.value)
    model = OrtMraModel.from_pretrained(qa["int8"])
    with pytest.raises(UserError, match="this export is int8"):
        model.to("cuda")
    assert model.providers == ["CPUExecutionProvider"]  # unchanged


def test_export_json_of_int8_is_checked(qa, tmp_path):
    record = json.loads((qa["int8"] / "export.json").read_text())
    for edit, problem in [({"flavour": "plugin"}, "dtype int8 with the plugin flavour"),
                          ({"quantization": None}, "dtype int8 without the quantized nodes"),
                          ({"dtype": "fp32"}, "a fp32 export has quantization")]:
        folder = shutil.copytree(qa["int8"], tmp_path / str(len(list(tmp_path.iterdir()))))
        (folder / "export.json").write_text(json.dumps({**record, **edit}))
        with pytest.raises(UserError, match=f"is corrupt \\({problem}\\)"):
            ExportInfo.load(folder)


def test_bench_int8_targets_are_the_ratios_of_the_measured_cells():
    def cell(seconds, megabytes):
        return {"median_s": seconds, "peak_memory_mb": megabytes}

    run = {"results": [{"batch": 1, "length": 4096, "backends": {
        "mra onnxruntime": cell(0.6, 420.0), "mra onnxruntime int8": cell(0.3, 430.0)}}]}
    def int8_targets():
        return [t for t in bench_report.targets(run) if "int8" in t["text"]]

    speed, memory = int8_targets()
    assert (speed["value"], speed["met"]) == (pytest.approx(2.0), True)
    assert (memory["value"], memory["met"]) == (pytest.approx(430 / 420), False)
    run["results"][0]["backends"]["mra onnxruntime int8"] = cell(0.5, 400.0)
    speed, memory = int8_targets()
    assert (speed["met"], memory["met"]) == (False, True)  # 1.2x < 1.5x; 400 MB <= 420 MB


def test_int8_defaults_to_the_cpu_provider_where_cuda_is_available(monkeypatch):
    """onnxruntime's int8 kernels are CPU ones: on a GPU machine an int8 export still gets the
    CPU provider by default, not CUDA's (which it would refuse)."""
    from mra_export.runtime import ort as ort_module

    monkeypatch.setattr(ort_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_module.choose_providers(None, "int8") == ["CPUExecutionProvider"]
    assert ort_module.choose_providers(None, "fp32") == [ort_module.CUDA_FP32, "CPUExecutionProvider"]


def test_an_int8_graph_that_computes_non_finite_values_is_refused_and_leaves_nothing(
        qa, tmp_path, monkeypatch, capsys):
    """quantize's own check runs the int8 graph on a sample: here onnxruntime answers a NaN for
    it (and only for it)."""
    fp32_graph = str(qa["fp32"] / "model.onnx")

    class NanForInt8(ort.InferenceSession):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            self.is_int8 = str(path) != fp32_graph

        def run(self, *args, **kwargs):
            values = super().run(*args, **kwargs)
            if self.is_int8:
                values[0][..., -1] = np.nan
            return values

    monkeypatch.setattr(quantize_module.ort, "InferenceSession", NanForInt8)
    assert main(["quantize", "--onnx", str(qa["fp32"]), "--out", str(tmp_path / "int8")]) == 2
    assert capsys.readouterr().err == (
        "mra-export quantize: error: the quantized model computes non-finite values on a "
        "sample; please report this\n")
    assert not (tmp_path / "int8").exists() and not no_leftovers(tmp_path)
