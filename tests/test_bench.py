"""``mra-export bench`` end to end, on small shapes so that it takes seconds.

The speed targets themselves are met in the recorded full run (tools/results/), not here.
"""

from __future__ import annotations

import json
import platform
import time
import types

import pytest
import torch

from mra_export import native
from mra_export.bench import models
from mra_export.bench.cli import cpu_name, run_bench
from mra_export.cli import main

from .conftest import SMALL_BENCH_SHAPES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in SMALL_BENCH_SHAPES.items():
            patch.setitem(models.SHAPES, key, value)
        run = run_bench(out, lengths=[512, 4096], batches=[1, 2], layers=1, budget=0.2,
                        command="mra-export bench (test)", log=lambda message: None)
    return out, run


def test_writes_json_markdown_and_plots_and_nothing_else(bench_run):
    out, run = bench_run
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert written == {"bench.json", "bench.md", "latency.png", "memory.png"}
    assert json.loads((out / "bench.json").read_text())["results"] == run["results"]
    table = (out / "bench.md").read_text()
    assert "mra-export bench (test)" in table and "| 2 | 4096 |" in table


def test_every_cpu_backend_is_timed_at_every_shape(bench_run):
    _, run = bench_run
    ran = {b["name"] for b in run["backends"] if not b.get("skipped")}
    expected = {"mra pytorch", "mra onnxruntime", "dense pytorch", "dense onnxruntime",
                "mra onnxruntime int8", "dense onnxruntime int8"}
    if not native.unbuilt(native.ORT_OP_LIBRARY):  # make plugins had onnxruntime's headers
        expected.add("mra onnxruntime (MraAttention op)")
    if not native.unbuilt(native.CPU_LIBRARY):  # the fused PyTorch op's C++ twin
        expected.add("mra pytorch (fused op)")
    assert ran == expected
    assert [(r["batch"], r["length"]) for r in run["results"]] == [(1, 512), (1, 4096),
                                                                   (2, 512), (2, 4096)]
    for row in run["results"]:
        for name in ran:
            cell = row["backends"][name]
            assert cell["median_s"] > 0 and cell["runs"] >= 3 and cell["peak_memory_mb"] >= 0


def test_backends_that_cannot_run_say_why(bench_run):
    _, run = bench_run
    skipped = {b["name"]: b["skipped"] for b in run["backends"] if b.get("skipped")}
    assert "mra tensorrt" in skipped and "TensorRT" in skipped["mra tensorrt"]
    assert all(reason for reason in skipped.values())


def test_without_a_gpu_every_gpu_column_says_so_in_both_precisions(bench_run):
    _, run = bench_run
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: its columns ran")
    skipped = {b["name"]: b["skipped"] for b in run["backends"] if b.get("skipped")}
    for tag in ("", " fp16"):
        for name in (f"mra pytorch-cuda{tag}", f"mra pytorch-cuda{tag} (fused op)",
                     f"dense pytorch-cuda{tag}", f"mra onnxruntime-cuda{tag}",
                     f"dense onnxruntime-cuda{tag}", f"mra onnxruntime-cuda{tag} (MraAttention op)"):
            assert skipped[name] == models.NO_GPU


def test_the_fp16_gpu_columns_run_fp16_graphs_and_models(tmp_path, monkeypatch):
    """What the GPU columns are made of, on this CPU: the fp16 exports (portable MRA and
    RoBERTa) hold fp16 weights and outputs, and the PyTorch columns get fp16 models."""
    import onnx

    for key, value in SMALL_BENCH_SHAPES.items():
        monkeypatch.setitem(models.SHAPES, key, value)
    monkeypatch.setattr(models, "cuda_available", lambda: True)
    handed = {}

    def torch_column(name, kind, model, device):
        handed[name] = next(model.parameters()).dtype
        return models.Backend(name, kind, f"pytorch-{device}", skipped="recorded")

    monkeypatch.setattr(models, "torch_backend", torch_column)
    mra, dense = models.build_models(1)
    columns = models.cuda_backends(mra, dense, tmp_path, log=lambda message: None, dtype="fp16")
    assert [c.name for c in columns] == [
        "mra pytorch-cuda fp16", "mra pytorch-cuda fp16 (fused op)", "dense pytorch-cuda fp16",
        "mra onnxruntime-cuda fp16", "dense onnxruntime-cuda fp16",
        "mra onnxruntime-cuda fp16 (MraAttention op)"]
    assert handed["mra pytorch-cuda fp16"] == handed["dense pytorch-cuda fp16"] == torch.float16
    assert next(mra.parameters()).dtype == torch.float32  # the CPU columns keep theirs
    for graph in ("mra-fp16.onnx", "dense-fp16.onnx"):
        model = onnx.load(tmp_path / graph)
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        floating = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        weights = {w.data_type for w in model.graph.initializer
                   if len(w.dims) == 2 and w.data_type in floating}  # the weight matrices
        assert weights == {onnx.TensorProto.FLOAT16}


def test_gpu_targets_are_the_ratios_of_the_gpu_cells():
    from mra_export.bench import report

    def cell(seconds):
        return {"median_s": seconds, "peak_memory_mb": 1.0, "runs": 3}

    rows = [{"batch": batch, "length": 4096, "backends": {
        "mra onnxruntime-cuda fp16": cell(0.6 * batch), "dense onnxruntime-cuda fp16": cell(1.0 * batch),
        "mra pytorch-cuda fp16 (fused op)": cell(1.1), "dense pytorch-cuda fp16": cell(1.0)}}
        for batch in (1, 8)]
    for layers, judged in ((1, None), (12, False)):
        checks = report.targets({"results": rows, "layers": layers})
        shares = [c for c in checks if "portable graph" in c["text"]]
        assert [round(c["value"], 3) for c in shares] == [0.6, 0.6]
        assert all(c["met"] for c in shares)
        whole = [c for c in checks if "fused op" in c["text"]]
        assert [round(c["value"], 3) for c in whole] == [1.1, 1.1]
        assert all(c["met"] is judged for c in whole)


def test_targets_are_the_ratios_of_the_measured_cells(bench_run):
    _, run = bench_run
    cell = {(r["length"], name): res for r in run["results"] if r["batch"] == 1
            for name, res in r["backends"].items()}
    speedup = cell[4096, "mra pytorch"]["median_s"] / cell[4096, "mra onnxruntime"]["median_s"]
    versus_dense = cell[4096, "mra onnxruntime"]["median_s"] / cell[4096, "dense onnxruntime"]["median_s"]
    growth = cell[4096, "mra onnxruntime"]["median_s"] / cell[512, "mra onnxruntime"]["median_s"]
    values = [t["value"] for t in run["targets"]]
    assert values[:3] == pytest.approx([speedup, versus_dense, growth])
    # The 2x over PyTorch is retired (reported, not judged); memory is judged on onnxruntime only.
    assert [t["met"] for t in run["targets"][:3]] == [None, versus_dense <= 0.6, growth <= 10]
    memory = {t["text"].split(":")[0]: t["met"] for t in run["targets"] if "peak memory" in t["text"]}
    assert memory["peak memory at 4096 tokens, pytorch"] is None
    assert memory["peak memory at 4096 tokens, onnxruntime"] is not None
    text = (bench_run[0] / "bench.md").read_text()
    assert "- info: at 4096 tokens, batch 1, onnxruntime MRA is" in text
    assert "NOT MET: at 4096 tokens, batch 1, onnxruntime MRA is" not in text


def test_cpu_targets_are_judged_at_batch_1_whatever_the_order_of_the_batches():
    """Issue 6's targets: at batch 1, MRA on onnxruntime within 0.6x dense's time at 4096 tokens
    and growing at most 10x from 512 to 4096 tokens. Rows of batch 8 (listed first, as with
    --batches 8,1) must not stand in for batch 1's."""
    from mra_export.bench import report

    def cell(seconds):
        return {"median_s": seconds, "peak_memory_mb": 1.0, "runs": 3}

    def rows(batch, mra_512, mra_4096, dense_4096):
        return [{"batch": batch, "length": 512, "backends": {"mra onnxruntime": cell(mra_512)}},
                {"batch": batch, "length": 4096, "backends": {
                    "mra onnxruntime": cell(mra_4096), "dense onnxruntime": cell(dense_4096)}}]

    for mra_4096, dense_4096, grows_within_target in ((12.0, 15.0, False), (10.0, 20.0, True)):
        run = {"results": rows(8, 1.0, 5.0, 100.0) + rows(1, 1.0, mra_4096, dense_4096)}
        targets = report.targets(run)
        versus_dense = next(t for t in targets if "the time of onnxruntime dense" in t["text"])
        growth = next(t for t in targets if "mra onnxruntime time grows" in t["text"])
        assert versus_dense["value"] == pytest.approx(mra_4096 / dense_4096)
        assert versus_dense["met"] is (mra_4096 / dense_4096 <= 0.6)
        assert growth["value"] == pytest.approx(mra_4096)  # from 1.0 s at 512 tokens
        assert growth["met"] is grows_within_target  # 12x misses the 10x target; 10x meets it


def test_a_stopped_bench_leaves_nothing_and_keeps_the_earlier_run(bench_run, tmp_path,
                                                                   monkeypatch):
    earlier, _ = bench_run
    for key, value in SMALL_BENCH_SHAPES.items():
        monkeypatch.setitem(models.SHAPES, key, value)
    before = {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()}

    def placeholder_export(model, path, flavour="portable"):  # what the files hold is not tested
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a graph")
        return path

    def stop_after_the_exports(message):
        if message.startswith("quantizing"):  # both models written into the run's folder by now
            raise KeyboardInterrupt

    monkeypatch.setattr(models, "export", placeholder_export)
    for out in (earlier, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            run_bench(out, lengths=[256], batches=[1], layers=1, budget=0.2, command="(test)",
                      log=stop_after_the_exports)
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == before
    assert list(tmp_path.iterdir()) == []
    assert not [p for p in earlier.parent.iterdir() if p.name.startswith(f".{earlier.name}.")]


def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    for flags, message in [
        (["--lengths", "4097"], "--lengths must be within 1..4096, got 4097"),
        (["--lengths", ","], "--lengths takes comma-separated integers, got ','"),
        (["--batches", "one"], "--batches takes comma-separated integers, got 'one'"),
        (["--batches", "1,,2"], "--batches takes comma-separated integers, got '1,,2'"),
        (["--batches", "0,1"], "--batches must be at least 1, got 0,1"),
        (["--layers", "0"], "--layers must be at least 1, got 0"),
        (["--budget", "-1"], "--budget must be a positive number of seconds, got -1.0"),
        (["--budget", "inf"], "--budget must be a positive number of seconds, got inf"),
        (["--budget", "nan"], "--budget must be a positive number of seconds, got nan"),
        (["--out", str(tmp_path / "a-file" / "b")], f"cannot write to {tmp_path / 'a-file' / 'b'}: "),
    ] + ([] if torch.cuda.is_available() else [
        (["--device", "cuda"], "--device cuda needs a CUDA GPU and there is none here; run --device cpu")]):
        assert main(["bench", "--out", str(tmp_path / "b"), *flags]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and message in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_size_given_twice_is_measured_once(monkeypatch, tmp_path):
    from mra_export.bench import cli as bench_cli

    asked = {}
    monkeypatch.setattr(bench_cli, "run_bench", lambda out, lengths, batches, *args, **kwargs:
                        asked.update(lengths=lengths, batches=batches))
    assert main(["bench", "--lengths", "512,16,512,16", "--batches", "8,1,8",
                 "--out", str(tmp_path / "b")]) == 0
    assert asked == {"lengths": [512, 16], "batches": [8, 1]}


def test_a_run_without_the_target_cells_says_the_targets_were_not_evaluated():
    from mra_export.bench import report

    run = {"command": "c", "machine": "m", "model": "x", "backends": [], "results": []}
    run["targets"] = report.targets(run)
    assert run["targets"] == []
    assert report.markdown(run).rstrip().endswith(
        "Targets:\n\n- not evaluated: the CPU ones need batch 1 at 512 and 4096 tokens (the "
        "default lengths), the GPU ones 4096 tokens at batch 1 or 8")


def test_a_gpu_backend_gets_its_own_copy_of_the_model():
    """Module.to moves in place: the CPU backends must keep their model on the CPU."""
    import torch

    model = torch.nn.Linear(2, 2)
    backend = models.torch_backend("mra pytorch-meta", "mra", model, "meta")
    assert next(model.parameters()).device.type == "cpu"
    assert backend.runtime == "pytorch-meta"


def test_gpu_cells_measure_device_memory(monkeypatch):
    from mra_export.bench import measure as measure_module

    used = [100 << 20]  # bytes in use on the device, as cudaMemGetInfo would say
    monkeypatch.setattr(measure_module, "device_used_bytes", lambda: used[0])
    monkeypatch.setattr(measure_module, "release_cached_device_memory", lambda: None)

    def run():
        used[0] += 5 << 20  # each run keeps 5 MB more on the device, none on the host

    first = measure_module.measure(run, min_runs=3, max_runs=3, budget_s=0, on_gpu=True)
    assert first["memory"] == "gpu" and first["peak_memory_mb"] == 5.0
    assert measure_module.measure(lambda: None, max_runs=3, budget_s=0)["memory"] == "host"
    assert models.Backend("x", "mra", "onnxruntime-cuda").on_gpu
    assert models.Backend("x", "mra", "tensorrt-fp16").on_gpu
    assert not models.Backend("x", "mra", "onnxruntime-cpu").on_gpu


def test_a_cell_that_fails_with_any_error_is_reported_not_fatal():
    """onnxruntime's and Polygraphy's exceptions are not RuntimeErrors; one cell must not stop
    the whole run."""
    from mra_export.bench.cli import _measure_cell

    class ProviderFailure(Exception):  # as onnxruntime's EPFail derives from Exception
        pass

    def prepare(batch, length):
        raise ProviderFailure("CUDA out of memory in the provider\nmore detail")

    cell = _measure_cell(models.Backend("mra onnxruntime-cuda", "mra", "onnxruntime-cuda", prepare),
                         1, 512, budget=0.1)
    assert cell == {"skipped": "failed: CUDA out of memory in the provider"}


def test_a_cell_is_the_median_of_its_timed_runs_after_one_warm_up(monkeypatch):
    """bench.md reports medians: a run's own clock says 0.3, 0.1 and 0.15 s after a 9 s
    warm-up, so the cell is 0.15 s (not their least, their mean, or the warm-up)."""
    from mra_export.bench import measure as measure_module

    clock, durations = [0.0], iter([9.0, 0.3, 0.1, 0.15])
    monkeypatch.setattr(measure_module, "time", types.SimpleNamespace(
        perf_counter=lambda: clock[0], sleep=time.sleep))

    def run():
        clock[0] += next(durations)

    cell = measure_module.measure(run, min_runs=3, max_runs=3, budget_s=0)
    assert (cell["median_s"], cell["runs"], cell["warmup_s"]) == (pytest.approx(0.15), 3, 9.0)


def test_dense_cells_needing_over_half_the_memory_are_skipped_before_they_run(monkeypatch):
    """Dense attention on the CPU materialises its scores: a cell needing more than half the
    available memory is skipped with the reason, not run into the machine's limit."""
    from mra_export.bench.cli import _measure_cell

    needed = models.dense_attention_bytes(8, 4096)

    def prepare(batch, length):
        return lambda: None

    backend = models.Backend("dense onnxruntime", "dense", "onnxruntime-cpu", prepare)
    monkeypatch.setattr(models, "available_bytes", lambda: int(needed * 1.9))
    skipped = _measure_cell(backend, 8, 4096, budget=0.01)
    assert skipped == {"skipped": f"needs ~{needed / 2**30:.1f} GB of attention scores, more "
                                  "than half the memory available here"}
    monkeypatch.setattr(models, "available_bytes", lambda: int(needed * 2.1))
    assert "median_s" in _measure_cell(backend, 8, 4096, budget=0.01)


def test_the_machine_line_names_the_cpu_model(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9R14\n")
    assert cpu_name(cpuinfo) == "AMD EPYC 9R14"
    # no such file (not Linux), or no model name in it (some ARM kernels): the architecture
    assert cpu_name(tmp_path / "missing") == (platform.processor() or platform.machine())
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_name(cpuinfo) == (platform.processor() or platform.machine())


def test_a_recorded_run_says_which_cpu_it_ran_on(bench_run):
    out, run = bench_run
    assert run["machine"].startswith(f"{cpu_name()} ({platform.machine()}), ")
    assert json.loads((out / "bench.json").read_text())["machine"] == run["machine"]
    assert f"Machine: {run['machine']}" in (out / "bench.md").read_text()
