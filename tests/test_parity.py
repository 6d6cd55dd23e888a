"""The parity command: report, table, per-head diagnostic and exit status."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from mra_export import native
from mra_export.checkpoints import build_checkpoint
from mra_export.cli import main
from mra_export.export import FLAVOURS
from mra_export.export.info import ExportInfo
from mra_export.parity import run_parity
from mra_export.parity.backends import PLUGIN_GRAPH_NODES
from mra_export.tasks import TASKS

from .conftest import ONE_LAYER_MODEL, SMALL_MODEL, cut_short_and_resigned, export_both_flavours

pytestmark = pytest.mark.slow

PLUGIN_ITSELF = "plugin graph on CPU (onnx.reference, plugin on emulated CUDA)"


def plugin_graph_backends(dtype: str = "fp32") -> set:
    """The backends that run a plugin-flavour export here: the plugin itself only where
    `make plugins` had TensorRT's headers (not in CI), onnxruntime with the op library where it
    had onnxruntime's (not for bf16: onnxruntime's CPU provider lacks bf16 kernels)."""
    ran = {"plugin graph on CPU (onnx.reference, PyTorch node)",
           "plugin graph on CPU (onnx.reference, C++ plugin twin)"}
    if not native.unbuilt(*native.EMULATED_PLUGIN_LIBRARIES):
        ran.add(PLUGIN_ITSELF)
    if not native.unbuilt(native.ORT_OP_LIBRARY) and dtype != "bf16":
        ran.add("onnxruntime-cpu (MraAttention op)")
    return ran


def test_parity_passes_and_writes_a_report(small_checkpoints, exports, tmp_path, capsys):
    report = tmp_path / "reports" / "report.json"  # a folder that does not exist yet
    code = main(["parity", "--model", str(small_checkpoints["token-classification"]),
                 "--onnx", str(exports["token-classification", "portable"]),
                 "--onnx", str(exports["token-classification", "plugin"]),
                 "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "PASSED" in printed and "FAIL" not in printed
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["task"] == "token-classification"
    ran = {b["backend"]: b for b in data["backends"] if b["status"] != "skipped"}
    assert set(ran) == {"onnxruntime-cpu"} | plugin_graph_backends()
    for backend in ran.values():
        assert backend["outputs"]["logits"]["tolerance"] == 1e-4  # docs/usage.md's, for fp32
        assert backend["outputs"]["logits"]["max_abs"] <= 1e-4
        assert len(backend["attention"]["per_head_max_abs"]) == 2  # layers
        assert len(backend["attention"]["per_head_max_abs"][0]) == 2  # heads
    skipped = {b["backend"]: b["reason"] for b in data["backends"] if b["status"] == "skipped"}
    assert "TensorRT" in skipped["tensorrt"]
    if PLUGIN_ITSELF not in ran:
        assert "TensorRT_ROOT" in skipped[PLUGIN_ITSELF]
    assert len(data["inputs"]) == 8


def test_heads_narrower_than_32_are_compared_as_the_graphs_hold_them(tmp_path):
    """The attention core pads head dims under 32 (as transformers does), and the exported graphs
    name its padded output: the per-head diagnostic compares that same tensor on both sides."""
    narrow = dict(ONE_LAYER_MODEL, hidden_size=32, intermediate_size=64)  # 2 heads of 16
    checkpoint = build_checkpoint(tmp_path / "narrow", TASKS["fill-mask"], **narrow)
    folders = export_both_flavours(checkpoint, tmp_path, task="fill-mask")
    report = run_parity(checkpoint, list(folders.values()), log=lambda m: None)
    assert report.passed
    checked = [b for b in report.to_dict()["backends"] if b["status"] != "skipped"]
    assert len(checked) == 1 + len(plugin_graph_backends())
    for backend in checked:
        worst = max(max(heads) for heads in backend["attention"]["per_head_max_abs"])
        assert 0 <= worst <= 1e-4


def skip_where_onnx_cannot_run(dtype: str) -> None:
    """The installed onnx's reference evaluator may not run the graph's type (the runner then
    refuses in one line, tested below)."""
    from mra_export.runtime.plugin_reference import bf16_unsupported_reason

    reason = bf16_unsupported_reason(dtype)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_exports_match_pytorch_within_their_tolerance(request, dtype):
    """The fp16/bf16 graphs TensorRT engines are built from, run on the CPU against the float32
    PyTorch model: close, but not float32-close (they really compute in reduced precision).
    bf16 runs on the default checkpoint's weight scale (see the ``bf16_exports`` fixture)."""
    skip_where_onnx_cannot_run(dtype)
    checkpoint, folders = request.getfixturevalue(f"{dtype}_exports")
    folders = [folders[flavour] for flavour in FLAVOURS]
    for folder in folders:  # the export's config says the graph's type
        assert json.loads((folder / "config.json").read_text())["dtype"] == {
            "fp16": "float16", "bf16": "bfloat16"}[dtype]
    report = run_parity(checkpoint, folders, log=lambda m: None).to_dict()
    ran = {b["backend"]: b for b in report["backends"] if b["status"] != "skipped"}
    expected = plugin_graph_backends(dtype) | ({"onnxruntime-cpu"} if dtype == "fp16" else set())
    assert set(ran) == {f"{name} [{dtype}]" for name in expected}
    assert report["passed"]
    for backend in ran.values():
        worst = max(output["max_abs"] for output in backend["outputs"].values())
        assert {output["tolerance"] for output in backend["outputs"].values()} == {
            {"fp16": 2e-2, "bf16": 5e-2}[dtype]}
        assert 1e-5 < worst <= backend["attention"]["tolerance"]


def _matmul_before_onnx_1_23(self, a, b):
    """onnx.reference's MatMul before onnx 1.23 (op_matmul.numpy_matmul then): numpy's matmul
    of bfloat16 tensors of 3 dimensions or more comes back float32, left so."""
    return (np.dot(a, b) if a.ndim <= 2 and b.ndim <= 2 else np.matmul(a, b),)


def test_bf16_plugin_graph_runs_on_an_onnx_whose_matmul_promotes_bfloat16(bf16_exports,
                                                                           monkeypatch):
    """onnx 1.19 to 1.22 refused their own bf16 MatMul's float32 product: the runner casts it
    back, as onnx 1.23 does, so those versions give the numbers the newest gives."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import RuntimeTypeError
    from onnx.reference.ops import op_matmul

    from mra_export.runtime.plugin_reference import (NODE_IMPLEMENTATIONS, ReferencePluginModel,
                                                     _node_class)

    skip_where_onnx_cannot_run("bf16")
    folder = bf16_exports[1]["plugin"]
    ids = np.random.default_rng(0).integers(5, 90, size=(2, 48))
    newest = dict(ReferencePluginModel.from_pretrained(folder)(input_ids=ids))
    monkeypatch.setattr(op_matmul.MatMul, "_run", _matmul_before_onnx_1_23)
    graph = onnx.load(str(folder / "model.onnx"))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}
    with pytest.raises(RuntimeTypeError, match="MatMul"):  # the stand-in is the old failure
        ReferenceEvaluator(graph, new_ops=[_node_class(NODE_IMPLEMENTATIONS["torch"])]).run(
            None, {i.name: feed[i.name] for i in graph.graph.input})
    older = dict(ReferencePluginModel.from_pretrained(folder)(input_ids=ids))
    assert newest.keys() == older.keys() and newest
    for name, value in newest.items():
        assert older[name].dtype == value.dtype and np.array_equal(older[name], value), name


def test_bf16_plugin_graph_on_an_onnx_holding_bfloat16_as_integers_is_one_line(bf16_exports,
                                                                              monkeypatch):
    """Before onnx 1.19, onnx.reference held bfloat16 as raw uint16 and computed wrong numbers
    (measured with 1.17.0 and 1.18.0): parity skips those backends with the upgrade, and the
    runner refuses in one line."""
    from mra_export.errors import UserError
    from mra_export.parity.backends import export_backends
    from mra_export.runtime.plugin_reference import ReferencePluginModel

    folders = bf16_exports[1]
    fix = "pip install --upgrade 'onnx>=1.19'"
    monkeypatch.setattr(onnx, "__version__", "1.18.0")
    reference = [b for b in export_backends(folders["plugin"]) if "onnx.reference" in b.name]
    assert len(reference) == len(PLUGIN_GRAPH_NODES)
    for backend in reference:
        assert backend.skipped.endswith(fix) and backend.load is None, backend.name
    with pytest.raises(UserError, match="^onnx 1.18.0's reference evaluator holds bfloat16 as "
                                        "raw integers and cannot run a bf16 graph: "
                                        + re.escape(fix) + "$"):
        ReferencePluginModel.from_pretrained(folders["plugin"])
    monkeypatch.setattr(onnx, "__version__", "1.19.0")
    assert all(b.skipped is None for b in export_backends(folders["plugin"])
               if "onnx.reference" in b.name and "emulated" not in b.name)


def test_a_different_model_fails_and_names_the_first_diverging_head(exports, tmp_path, capsys):
    other = build_checkpoint(tmp_path / "other", TASKS["text-classification"], seed=1,
                             **SMALL_MODEL)
    code = main(["parity", "--model", str(other),
                 "--onnx", str(exports["text-classification", "portable"])])
    printed, warned = capsys.readouterr()
    assert code == 1
    assert "FAIL: first diverges at layer 0, head 0" in printed
    assert printed.rstrip().endswith("FAILED")
    exported = exports["text-classification", "portable"]
    assert warned == (f"note: {exported} was exported from "  # on stderr, beside the results
                      f"{ExportInfo.load(exported).source}, not from {other}\n")


def test_an_export_named_twice_is_checked_once(small_checkpoints, exports, monkeypatch):
    exported = exports["multiple-choice", "portable"]
    monkeypatch.chdir(exported.parent)
    report = run_parity(small_checkpoints["multiple-choice"],
                        [exported, f"./{exported.name}", exported / "."], log=lambda m: None)
    assert [b.backend for b in report.backends] == ["onnxruntime-cpu", "onnxruntime-cuda",
                                                       "tensorrt"]
    # One folder, not in a list: the folder, not its letters (nor a path's parts).
    for one in (exported.name, exported):
        report = run_parity(small_checkpoints["multiple-choice"], one, log=lambda m: None)
        assert [(b.backend, Path(b.source).resolve()) for b in report.backends][:1] == [
            ("onnxruntime-cpu", exported.resolve())]


def test_parity_of_exports_for_different_tasks_is_refused(small_checkpoints, exports):
    from mra_export.errors import UserError

    with pytest.raises(UserError, match="different tasks"):
        run_parity(small_checkpoints["fill-mask"], [exports["fill-mask", "portable"],
                                                    exports["question-answering", "portable"]])
    with pytest.raises(UserError, match="nothing to check"):
        run_parity(small_checkpoints["fill-mask"])
    with pytest.raises(UserError, match="nothing to check"):
        run_parity(small_checkpoints["fill-mask"], None)


def test_bad_inputs_to_parity_are_one_line_before_any_work(small_checkpoints, exports, tmp_path,
                                                          capsys):
    import shutil

    corrupt = shutil.copytree(exports["fill-mask", "portable"], tmp_path / "corrupt")
    with open(corrupt / "model.onnx", "r+b") as stream:
        stream.truncate(1000)
    resigned = cut_short_and_resigned(exports["fill-mask", "portable"], tmp_path / "resigned")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    narrower = build_checkpoint(tmp_path / "narrower", TASKS["fill-mask"],
                                **{**SMALL_MODEL, "max_position_embeddings": 128})
    fill_mask = ["--model", str(small_checkpoints["fill-mask"]),
                 "--onnx", str(exports["fill-mask", "portable"])]
    for arguments, message in [
        ([*fill_mask, "--report", ""], "--report takes a file name, got ''"),
        ([*fill_mask, "--report", str(tmp_path / "notes.json")],
         "notes.json exists and is not a parity report; choose a new file name"),
        (["--model", str(small_checkpoints["fill-mask"]), "--onnx", ""],
         "--onnx and --engine take a folder, got ''"),
        (["--model", str(narrower), "--onnx", str(exports["fill-mask", "portable"])],
         "was exported from a model with max_position_embeddings=256, but --model has 128; pass "
         "the checkpoint the export was made from"),
        (["--model", str(small_checkpoints["fill-mask"]), "--onnx", str(corrupt)],
         r"corrupt/model.onnx does not match the sha256 in export.json \(changed or corrupt\); "
         "export the model again"),
        (["--model", str(small_checkpoints["fill-mask"]), "--onnx", str(resigned)],
         r"resigned/model.onnx is not a readable ONNX graph \(.*\); export the model again"),
        (["--model", str(small_checkpoints["fill-mask"]), "--onnx", str(exports["fill-mask", "portable"]),
          "--report", str(tmp_path / "a-file" / "report.json")], "cannot write to .*a-file"),
        (["--model", str(small_checkpoints["fill-mask"]), "--onnx", str(exports["fill-mask", "portable"]),
          "--report", str(tmp_path)], f"{tmp_path} is a folder; pass a file name"),
        (["--model", str(small_checkpoints["question-answering"]),
          "--onnx", str(exports["fill-mask", "portable"])],
         "has no weights for .* of the fill-mask head; pass the checkpoint the export was made from"),
    ]:
        assert main(["parity", *arguments]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing ran
        assert len(captured.err.strip().splitlines()) == 1
        assert re.search(message, captured.err)
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'


def test_a_failed_report_write_still_shows_the_results(small_checkpoints, exports, tmp_path,
                                                        capsys, monkeypatch):
    """The comparison takes minutes: a disk that fills up before the report is written must not
    take the table with it."""
    import errno

    from mra_export.parity import report as report_module

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report_module, "atomic_write_text", full_disk)
    code = main(["parity", "--model", str(small_checkpoints["fill-mask"]),
                 "--onnx", str(exports["fill-mask", "portable"]),
                 "--report", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 2
    assert re.search(r"fill-mask +onnxruntime-cpu +logits .* pass\n", captured.out)
    assert captured.err == (f"mra-export parity: error: {tmp_path / 'report.json'}: No space left "
                            "on device; free space there, or choose another output path\n")
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_report_is_replaced(tmp_path):
    from mra_export.parity.report import check_report_path

    for earlier in ('{"task": "fill-mask", "backends": [], "passed": true}',
                    '[{"task": "fill-mask", "backends": [], "passed": false}]'):  # the demo's
        (tmp_path / "report.json").write_text(earlier)
        check_report_path(tmp_path / "report.json")


def test_parity_with_nothing_that_can_run_here_fails(bf16_exports, tmp_path, capsys):
    """A bfloat16 portable export runs on onnxruntime's CUDA provider only: here every backend
    is skipped, and a run that checked nothing is no proof."""
    checkpoint, folders = bf16_exports
    code = main(["parity", "--model", str(checkpoint), "--onnx", str(folders["portable"]),
                 "--report", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert code == 1
    assert printed.rstrip().endswith("FAILED: no backend could run here, so nothing was checked "
                                     "(reasons above)")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False and report["checked"] == 0


def test_an_exported_model_runner_closes_its_model_when_deactivated():
    """An engine holds a CUDA stream and device buffers: parity must release each one it loads."""
    from mra_export.parity.runners import ExportedModelRunner

    class Model:
        closed = False

        def run_raw(self, arrays, extra_outputs=()):
            return {"logits": arrays["input_ids"].astype(np.float32)}

        def close(self):
            self.closed = True

    model = Model()
    runner = ExportedModelRunner(lambda: model, TASKS["text-classification"], ["input_ids"], [],
                                 name="fake")
    with runner:
        (value,) = runner.infer({"input_ids": np.array([[1, 2]])}).values()
    assert value.tolist() == [[1.0, 2.0]]
    assert model.closed and runner.model is None


def test_an_attention_context_of_another_shape_is_named_not_a_crash():
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    from mra_export.parity.compare import ShapeMismatch, _per_head_max_abs

    def results(runner, width):
        return (runner, [IterationResult({"attention_context.0": np.zeros((1, 2, 17, width))},
                                         runner_name=runner)])

    pair = RunResults([results("pytorch", 16), results("onnxruntime-cpu", 32)])
    with pytest.raises(ShapeMismatch, match=r"attention_context.0 has shape \[1, 2, 17, 32\], "
                                            r"PyTorch's \[1, 2, 17, 16\]"):
        _per_head_max_abs(pair, ["attention_context.0"])
    same = RunResults([results("pytorch", 16), results("onnxruntime-cpu", 16)])
    assert _per_head_max_abs(same, ["attention_context.0"]) == [[0.0, 0.0]]


class _FakeExport:
    """An exported model whose outputs are PyTorch's but for ``changes``: {(feed, name): delta}
    added to that output on that feed (an attention context's delta to head 1 only)."""

    class info:
        attention_context_layout = "bhsd"

    def __init__(self, reference, changes):
        self.reference, self.changes, self.feed = reference, changes, 0

    def run_raw(self, arrays, extra_outputs=()):
        values = {name: value.copy() for name, value in self.reference[self.feed].items()}
        for (feed, name), delta in self.changes.items():
            if feed == self.feed:
                target = values[name][:, 1] if name.startswith("attention_context") else values[name]
                target += delta
        self.feed += 1
        return values

    def close(self):
        pass


def _check_fake_backend(changes, task="question-answering", int8=False):
    """check_backend on two feeds whose last 3 of 8 tokens are padding, an export that differs
    from PyTorch by ``changes``; judged by task agreement where ``int8``."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    from mra_export.parity.backends import TOLERANCES, Backend
    from mra_export.parity.compare import check_backend

    generator = np.random.default_rng(0)
    names = [*TASKS[task].outputs, "attention_context.0"]
    shapes = {"attention_context.0": (1, 2, 8, 32)}
    reference = [{name: generator.standard_normal(shapes.get(name, (1, 8))).astype(np.float32)
                  for name in names} for _ in range(2)]
    mask = np.array([[1] * 5 + [0] * 3])
    feeds = [{"input_ids": np.ones((1, 8), np.int64), "attention_mask": mask} for _ in range(2)]
    pytorch = RunResults([("pytorch", [IterationResult(values, runner_name="pytorch")
                                       for values in reference])])
    backend = Backend("fake", "fake", TOLERANCES["int8" if int8 else "fp32"], agreement=int8,
                      attention=not int8, load=lambda: _FakeExport(reference, changes))
    return check_backend(backend, pytorch, feeds, TASKS[task], ["input_ids", "attention_mask"],
                         ["attention_context.0"])


def test_numpys_warnings_in_polygraphys_logged_statistics_are_not_shown(monkeypatch):
    """numpy 2.2.6 (Python 3.10's) overflowed in the float16 percentiles polygraphy computes for
    its silenced log, and parity printed RuntimeWarnings; a stand-in overflows the same way."""
    from polygraphy.comparator import util as comparator_util

    def overflowing_quantile(buffer, q):
        return float(np.float16(65504) * np.float16(2))  # inf, with numpy's overflow warning

    monkeypatch.setattr(comparator_util, "compute_quantile", overflowing_quantile)
    with warnings.catch_warnings(record=True) as shown:  # as errors, polygraphy would catch them
        warnings.simplefilter("always")
        result = _check_fake_backend({(1, "end_logits"): 3e-3})
    assert [str(warning.message) for warning in shown] == []
    assert result.outputs["end_logits"].max_abs == pytest.approx(3e-3, rel=1e-3)
    assert result.status == "failed" and result.outputs["start_logits"].passed


def test_an_output_that_differs_on_one_feed_fails_the_backend_alone():
    """Each output is judged on every feed, by its worst: here QA's second output on the second
    feed only, while the attention matches."""
    assert _check_fake_backend({}).status == "passed"
    result = _check_fake_backend({(1, "end_logits"): 3e-3})
    assert result.status == "failed" and result.attention.passed
    assert result.outputs["end_logits"].max_abs == pytest.approx(3e-3, rel=1e-3)
    assert not result.outputs["end_logits"].passed
    assert result.outputs["start_logits"].max_abs == 0 and result.outputs["start_logits"].passed


def test_a_head_that_differs_on_one_feed_is_the_first_divergence():
    result = _check_fake_backend({(1, "attention_context.0"): 2e-3})
    assert result.status == "failed" and all(o.passed for o in result.outputs.values())
    (heads,) = result.attention.per_head_max_abs
    assert heads[0] == 0 and abs(heads[1] - 2e-3) < 1e-6
    assert result.attention.first_divergence == {"layer": 0, "head": 1, "max_abs": heads[1]}
    nan = _check_fake_backend({(0, "attention_context.0"): float("nan")})
    assert nan.status == "failed" and nan.attention.first_divergence["head"] == 1
    assert math.isnan(nan.attention.first_divergence["max_abs"])


def test_int8_agreement_counts_real_tokens_only():
    """An int8 answer judged by its argmaxes over the real tokens: a padded token's score, however
    high, is no answer, while a real token's moves the argmax."""
    padded, real = np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)
    padded[0, 7], real[0, 2] = 100, 100  # PyTorch's argmax: token 1 of the real ones, 5 of all
    result = _check_fake_backend({(1, "start_logits"): padded}, int8=True)
    assert result.status == "passed" and result.outputs["start_logits"].max_abs == 100
    assert [(a.value, a.count) for a in result.agreement][0] == (1.0, 2)
    moved = _check_fake_backend({(1, "start_logits"): real}, int8=True)
    assert moved.status == "failed" and moved.agreement[0].value == 0.5


def test_a_backend_that_errs_fails_the_report():
    from mra_export.parity.report import BackendResult, ParityReport

    passed = BackendResult("onnxruntime-cpu", "x", "passed")
    for other in ("error", "failed"):
        report = ParityReport("m", "fill-mask", [], [passed, BackendResult("b", "y", other)])
        assert report.checked == 2 and not report.passed
    skipped = BackendResult("tensorrt", "z", "skipped", "no TensorRT")
    assert ParityReport("m", "fill-mask", [], [passed, skipped]).passed


def test_sparse_mode_and_priors_reach_both_flavours(tmp_path):
    """Every other export here is full mode without priors: a checkpoint in sparse mode with
    priors, its plugin nodes carrying those settings, and every backend agreeing with PyTorch."""
    settings = dict(approx_mode="sparse", initial_prior_first_n_blocks=1,
                    initial_prior_diagonal_n_blocks=3)
    checkpoint = build_checkpoint(tmp_path / "checkpoint", TASKS["fill-mask"],
                                  **ONE_LAYER_MODEL, **settings)
    folders = export_both_flavours(checkpoint, tmp_path, task="fill-mask")
    (node,) = [n for n in onnx.load(str(folders["plugin"] / "model.onnx")).graph.node
               if n.op_type == "MraAttention"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert {name: attributes[name] for name in settings} == {
        "approx_mode": b"sparse", "initial_prior_first_n_blocks": 1,
        "initial_prior_diagonal_n_blocks": 3}
    report = run_parity(checkpoint, list(folders.values()), log=lambda message: None)
    ran = {b.backend for b in report.backends if b.status != "skipped"}
    assert ran == {"onnxruntime-cpu"} | plugin_graph_backends() and report.passed


@pytest.mark.parametrize("failing_heads,verdict", [((), "ALL PASSED"),
                                                   (("question-answering",), "FAILURES ABOVE")])
def test_the_demo_passes_only_when_every_heads_parity_passes(tmp_path, monkeypatch,
                                                               failing_heads, verdict):
    """One head failing parity fails the demo (and its exit status), whatever the others do.
    The checkpoints, exports and parity runs are stood in for: only the verdict is checked."""
    from mra_export import demo
    from mra_export.parity.report import BackendResult, ParityReport

    def parity(checkpoint, exports, engines, log):
        task = Path(checkpoint).name
        status = "failed" if task in failing_heads else "passed"
        backend = BackendResult("onnxruntime-cpu", "x", status)
        return ParityReport(str(checkpoint), task, [], [backend])

    monkeypatch.setattr(demo, "build_default_checkpoints",
                        lambda root: {task: Path(root) / task for task in TASKS})
    monkeypatch.setattr(demo, "padding_unsupported_reason", lambda: "not under test")
    monkeypatch.setattr(demo, "export_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "_engines", lambda *args: {})
    monkeypatch.setattr(demo, "run_parity", parity)
    lines = []
    assert demo.run_demo(tmp_path / "demo", log=lines.append) is (not failing_heads)
    assert lines[-1].endswith(verdict)
    summary = json.loads((tmp_path / "demo" / demo.SUMMARY).read_text())
    assert [head["passed"] for head in summary] == [task not in failing_heads for task in TASKS]
