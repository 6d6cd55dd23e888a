"""tools/memory_trace.py, memory_floor.py, speed_ceiling.py and profile_layer.py end to end, on
small shapes.

Their numbers are quoted in docs/performance.md from full-size runs; here they must
run, report every step and operator they promise, and leave ``mra_export`` as they found it.
"""

from __future__ import annotations

import re
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mra_export import attention, patching
from mra_export.bench import models

from .conftest import SMALL_BENCH_SHAPES, TOOLS, load_tool

pytestmark = pytest.mark.slow


@pytest.fixture
def small_models(monkeypatch):
    for key, value in SMALL_BENCH_SHAPES.items():
        monkeypatch.setitem(models.SHAPES, key, value)


def megabytes(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(-?\d+\.\d) ", line.replace(" MB", " "))]


def test_memory_trace_reports_every_attention_step_and_restores_them(small_models, capsys):
    memory_trace = load_tool("memory_trace")
    before = {name: getattr(attention, name) for name in memory_trace.STEPS}
    entry = patching.mra_attention
    memory_trace.main(["--length", "512"])
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [line.split()[0] for line in lines[:-1]]
    assert set(steps) == set(before) | {"mra_attention"}
    assert steps[-1] == "mra_attention"  # the outermost call ends last
    for line in lines[:-1]:
        start, peak, end = megabytes(line)
        assert peak >= max(start, end)
    assert lines[-1].startswith("one layer, batch 1, 512 tokens: peak ")
    assert {name: getattr(attention, name) for name in before} == before
    assert patching.mra_attention is entry


def test_profile_layer_prints_both_runtimes_operators(small_models, capsys, monkeypatch):
    tool = load_tool("profile_layer")
    profiles = {}  # each profiler's whole list, before the tool cuts it to its heaviest rows

    def keeping(name, profiler):
        def run(*args):
            profiles[name] = profiler(*args)
            return profiles[name]
        return run

    monkeypatch.setattr(tool, "profile_pytorch", keeping("pytorch", tool.profile_pytorch))
    monkeypatch.setattr(tool, "profile_onnxruntime",
                        keeping("onnxruntime", tool.profile_onnxruntime))
    tool.main(["--length", "1024", "--runs", "2"])
    out = capsys.readouterr().out
    sections = out.split("\n\n")
    assert sections[0].startswith(f"one MRA layer, batch 1, 1024 tokens, 2 runs; torch threads "
                                  f"{torch.get_num_threads()}")
    pytorch, onnxruntime, nodes = sections[1], sections[2], sections[3]
    assert pytorch.startswith("PyTorch (eager): ")
    assert onnxruntime.startswith("onnxruntime: ")
    assert nodes.startswith("onnxruntime: heaviest nodes")
    # The layer's linear products run as addmm in PyTorch and as MatMul in onnxruntime. Whether
    # they make the top rows depends on the machine (CI's did not, at these small widths), so
    # they are looked for in the whole profile, and the tables must be its heaviest rows.
    torch_ops = profiles["pytorch"][1]
    _, ort_ops, ort_nodes = profiles["onnxruntime"]
    assert "aten::addmm" in dict(torch_ops) and "MatMul" in dict(ort_ops)
    for section, whole in ((pytorch, torch_ops), (onnxruntime, ort_ops), (nodes, ort_nodes)):
        rows = section.splitlines()[1:]
        assert 0 < len(rows) == min(tool.TOP, len(whole))
        assert [row.split()[0] for row in rows] == [name.split()[0] for name, _ in whole[:len(rows)]]
        times = [float(row.split()[-2]) for row in rows]
        assert times == sorted(times, reverse=True) and times[0] > 0
        cut = whole[len(rows) - 1][1]
        assert all(ms <= cut for _, ms in whole[len(rows):])  # nothing heavier was left out


def test_memory_floor_frees_only_the_attention_and_restores_it(small_models, monkeypatch):
    memory_floor = load_tool("memory_floor")
    entry, free, calls = patching.mra_attention, memory_floor.free_attention, []

    def counting_free_attention(query, *args, **settings):
        calls.append(query.shape)
        return free(query, *args, **settings)

    monkeypatch.setattr(memory_floor, "free_attention", counting_free_attention)
    runs = memory_floor.peaks("mra, free attention", length=512, batch=2, runs=2)
    assert calls == [(2, SMALL_BENCH_SHAPES["num_attention_heads"], 512, 32)] * 2
    assert patching.mra_attention is entry
    assert len(runs) == 2 and all(whole >= before >= 0 for whole, before in runs)
    assert memory_floor.peaks("mra", length=512, batch=2, runs=1)  # the real attention runs
    assert not calls[2:]


def test_memory_floor_shows_a_free_attention_far_below_mra_in_fresh_processes(capsys):
    # The bench's real shapes at 1024 tokens, where the configured blocks are the whole grid:
    # MRA's attention holds 200 MB more than the rest of the layer, far beyond the noise.
    load_tool("memory_floor").main(["--length", "1024", "--runs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("one layer, batch 1, 1024 tokens, a process per model")
    rows = {line[2:22].strip(): megabytes(line.replace("(", " ").replace(")", " ") + " ")
            for line in lines[1:4]}
    assert set(rows) == {"dense", "mra", "mra, free attention"}
    (mra, mra_before), (free, free_before) = rows["mra"], rows["mra, free attention"]
    assert mra == mra_before  # MRA's attention sets its peak
    assert free > free_before  # with a free attention, the feed-forward layer does
    assert mra > free + 150
    assert lines[4].startswith(f"first run: the MRA model with a free attention peaks at {free:.1f} MB")


def op_counts(path) -> dict[str, int]:
    nodes = onnx.load(str(path)).graph.node
    return {op: sum(node.op_type == op for node in nodes) for op in ("MatMul", "CumSum")}


def test_speed_ceiling_exports_the_same_layer_with_only_the_attention_freed(small_models,
                                                                            tmp_path):
    speed_ceiling = load_tool("speed_ceiling")
    entry = patching.mra_attention
    mra, _ = models.build_models(layers=1)
    paths = speed_ceiling.exports(mra, tmp_path)
    assert patching.mra_attention is entry
    real, free = (op_counts(paths[name]) for name in
                  ("mra onnxruntime", "mra onnxruntime, free attention"))
    assert real["CumSum"] > 0 and free["CumSum"] == 0  # MRA's block selection is gone
    assert free["MatMul"] == 6  # but the query, key, value, output and feed-forward products stay

    ids, mask = models.inputs(2, 256)
    with mock.patch.object(patching, "mra_attention", speed_ceiling.free_attention), \
            torch.no_grad():
        expected = mra(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    session = ort.InferenceSession(str(paths["mra onnxruntime, free attention"]),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["last_hidden_state"], {"input_ids": ids.numpy(),
                                              "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_speed_ceiling_prints_the_ratio_its_times_give(small_models, capsys):
    load_tool("speed_ceiling").main(["--length", "512", "--batch", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("one MRA layer"))
    assert lines[start].startswith("one MRA layer, batch 2, 512 tokens, on ")
    rows = (line.strip().rsplit(None, 1) for line in lines[start + 1:start + 4])
    times = {name: float(ms) for name, ms in rows}
    assert set(times) == {"mra pytorch", "mra onnxruntime", "mra onnxruntime, free attention"}
    assert all(ms > 0 for ms in times.values())
    measured, ceiling = (float(x) for x in re.findall(r"(\d+\.\d+)x", lines[start + 4])[:2])

    def ratio_within_rounding(printed, pytorch, onnxruntime, half_step=0.005):
        low = (pytorch - half_step) / (onnxruntime + half_step) - half_step
        high = (pytorch + half_step) / (onnxruntime - half_step) + half_step
        return low <= printed <= high
    assert ratio_within_rounding(measured, times["mra pytorch"], times["mra onnxruntime"])
    assert ratio_within_rounding(ceiling, times["mra pytorch"],
                                 times["mra onnxruntime, free attention"])
    verdict = "within reach" if ceiling >= 2 else "out of reach"
    assert lines[start + 4].endswith(f"(target >= 2x: {verdict})")


def test_compare_commits_host_measures_python_around_the_kernels(capsys):
    """--host on the working tree, in a child process (it stubs the op's library call there)."""
    assert load_tool("compare_commits").main(["--worktree", "--host"]) == 0
    header, columns, row = capsys.readouterr().out.splitlines()
    assert header.startswith("Python around the kernels") and columns.split()[0] == "tree"
    name, auto, fused, roberta, auto_ratio, fused_ratio, op_call = row.split()
    assert name == "worktree" and float(op_call) > 0
    for ratio, mra in ((auto_ratio, auto), (fused_ratio, fused)):  # printed from unrounded times
        assert ratio.endswith("x") and float(ratio[:-1]) == pytest.approx(
            float(mra) / float(roberta), abs=0.006)


@pytest.mark.parametrize("tool, argv, message", [
    ("profile_layer", ["--length", "0"], "argument --length: must be within 1..4096, got 0"),
    ("profile_layer", ["--runs", "0"], "argument --runs: must be at least 1, got 0"),
    ("memory_trace", ["--batch", "x"], "argument --batch: takes an integer, got 'x'"),
    ("memory_floor", ["--runs", "0"], "argument --runs: must be at least 1, got 0"),
    ("speed_ceiling", ["--length", "4097"], "argument --length: must be within 1..4096, got 4097"),
    ("compare_commits", ["no-such-commit"], "'no-such-commit' is not a commit of"),
    ("compare_commits", ["HEAD", "--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("memory_counts", ["--out", "/no-such-folder/counts.md"],
     "argument --out: no folder /no-such-folder; make it first"),
    ("memory_counts", ["--patterns", "--profile"], "argument --profile: not allowed with argument --patterns"),
    ("sass_accesses", ["--arch", "90"], "argument --arch: '90' is not an architecture such as sm_90"),
    ("sass_accesses", ["--out", "/no-such-folder/sass.md"],
     "argument --out: no folder /no-such-folder; make it first"),
    ("occupancy", ["--out", "/no-such-folder/occupancy.md"],
     "argument --out: no folder /no-such-folder; make it first"),
    ("instruction_counts", ["--arch", "90"], "argument --arch: '90' is not an architecture such as sm_90"),
    ("instruction_counts", ["--out", "/no-such-folder/instructions.md"],
     "argument --out: no folder /no-such-folder; make it first"),
])
def test_the_tools_refuse_bad_arguments_in_one_line_before_any_work(tool, argv, message,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [f"{tool}.py"])  # argparse's program name
    with pytest.raises(SystemExit) as stopped:
        load_tool(tool).main(argv)
    assert stopped.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]  # argparse's usage line comes first
    assert last_line.startswith(f"{tool}.py: error: {message}")


@pytest.mark.parametrize("script, argv, message", [
    ("gpu_prepare.sh", ["--bogus"], "gpu_prepare.sh: unknown argument '--bogus'; usage:"),
    ("gpu_prepare.sh", ["--previous"], "gpu_prepare.sh: --previous needs a commit; usage:"),
    ("gpu_prepare.sh", ["--previous", "no-such-commit"],
     "gpu_prepare.sh: --previous no-such-commit is not a commit of this repository; usage:"),
    ("gpu_session.sh", ["bogus"],
     "gpu_session.sh: no section 'bogus'; the sections: ab bench check ncu ort sanitize smoke speed tests"),
])
def test_the_gpu_scripts_refuse_bad_arguments_in_one_line_before_any_work(script, argv, message,
                                                                         tmp_path):
    """The preparing script's builds take many minutes and the session script's call spends
    device time: both say a bad argument in a line, with what they take, before any of it."""
    import subprocess

    done = subprocess.run(["bash", str(TOOLS / script), *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(message)
    assert done.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("smoke_exit, said", [(1, "rc=1"), (124, "rc=124: a hang")])
def test_a_failed_smoke_test_leaves_out_the_sections_that_would_wait_on_the_kernels(
        smoke_exit, said, tmp_path):
    """gpu_session.sh on a stand-in python3 whose sanitize_kernels.py run fails (or, exiting
    124 as timeout does, hangs): the GPU tests and the ort section are left out, and
    gpu_check, which says which cases fail, still runs."""
    import subprocess

    calls = tmp_path / "calls"
    stand_in = tmp_path / "bin" / "python3"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                        f'case "$*" in *sanitize_kernels*) exit {smoke_exit};; esac\nexit 0\n')
    stand_in.chmod(0o755)
    done = subprocess.run(["bash", str(TOOLS / "gpu_session.sh"), "smoke", "tests", "check", "ort"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{stand_in.parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert done.returncode == 0, done.stderr
    assert f"== smoke FAILED ({said}): this call leaves out tests speed ncu ort bench" in done.stdout
    assert "tests left out: the kernels failed the smoke test" in done.stdout
    assert "ort left out: the kernels failed the smoke test" in done.stdout
    ran = calls.read_text()
    assert "gpu_check.py" in ran and "-m pytest" not in ran and "ort_cuda_speed" not in ran


def test_gpu_speed_tables_name_the_library_and_leave_out_what_did_not_run(monkeypatch):
    """gpu_speed's report (its numbers come from a GPU): an --op-only run, as the A/B of two
    kernel builds makes, has no whole-model section; a full run has both."""
    monkeypatch.syspath_prepend(str(TOOLS))  # gpu_speed imports gpu_check, as a script does
    gpu_speed = load_tool("gpu_speed")
    op = dict(dtype="float16", batch=8, length=4096, mra_device_ms=0.4, sdpa_device_ms=0.86,
              sdpa_over_mra_device=2.15, mra_python_ms=0.5, sdpa_python_ms=0.9)
    result = dict(device="NVIDIA H200", torch="2.11", command="python tools/gpu_speed.py --op-only",
                  library=".carry-libs/ab/161901a/libmra_attention_cuda.so", attention=[op],
                  models=[], kernels=[])
    op_only = gpu_speed.markdown(result)
    assert "Kernel library: `.carry-libs/ab/161901a/libmra_attention_cuda.so`" in op_only
    assert "| float16 | 8 | 4096 | 0.400 | 0.860 | 2.15x | 0.500 | 0.900 |" in op_only
    assert "Whole model" not in op_only and "heaviest kernels" not in op_only
    model = dict(batch=1, mra_fused_ms=11.0, mra_fused_head_major_ms=11.5, mra_reference_ms=38.0,
                 roberta_sdpa_ms=9.0, fused_over_roberta=1.22, head_major_over_fused=1.05)
    kernels = dict(model="mra fused", batch=1, total_ms=10.0, top=[("highResolutionMma", 4.0)])
    full = gpu_speed.markdown({**result, "models": [model], "kernels": [kernels]})
    assert "| 1 | 11.00 | 11.50 | 38.00 | 9.00 | 1.22x | 1.05x |" in full
    assert "4.000 ms `highResolutionMma`" in full


def test_kernel_profile_rates_against_the_named_gpus_fp16_peak(tmp_path):
    """kernel_profile's table from Nsight Compute's CSV: each case's last launch, its time, and the
    high-resolution kernel's tensor rate as a fraction of the peak of the GPU named (the same
    kernels, 132 SMs, on an H200 or on an H100 PCIe card with less than 80% of its peak)."""
    kernel_profile = load_tool("kernel_profile")
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    lines = [header]
    for launch, duration_ns in enumerate([900_000, 300_000, 900_000, 1_200_000]):  # b1 twice, b8 twice
        for metric, unit, value in (("Duration", "nsecond", f"{duration_ns:,}"),
                                    ("DRAM Throughput", "%", "41.5"),
                                    ("Compute (SM) Throughput", "%", "22.0"),
                                    ("Block Limit SM", "block", "32"),
                                    ("Block Limit Registers", "block", "4"),
                                    ("Block Limit Shared Mem", "block", "5"),
                                    ("Block Limit Warps", "block", "16"),
                                    ("Achieved Occupancy", "%", "23.75")):
            lines.append(f'"{launch}","void mra::highResolutionMma<__half, 64, 2>(mra::Problem)",'
                         f'"{metric}","{unit}","{value}"')
    csv_path = tmp_path / "ncu.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    # 12 heads x 128 query blocks x 8 blocks, 2 products of 32x64 by 64x32, 2 flops each
    tflops_b1 = 12 * 128 * 8 * 2 * 2 * 32 * 64 * 32 / 300e-6 / 1e12
    tflops_b8 = 8 * tflops_b1 * 300 / 1200
    h200 = kernel_profile.report(csv_path, "NVIDIA H200")
    assert h200.startswith("NVIDIA H200: its dense fp16 peak 989 TFLOP/s")
    assert (f"| 1 | highResolutionMma | 300.0 | 41.5 | 22.0 | {tflops_b1:.0f} | {100 * tflops_b1 / 989:.1f} "
            "| 4 (registers) | 23.75 |") in h200
    assert f"| 8 | highResolutionMma | 1200.0 | 41.5 | 22.0 | {tflops_b8:.0f} | {100 * tflops_b8 / 989:.1f} |" in h200
    pcie = kernel_profile.report(csv_path, "NVIDIA H100 PCIe")
    assert f"| {tflops_b1:.0f} | {100 * tflops_b1 / 756:.1f} |" in pcie
    unknown = kernel_profile.report(csv_path, "NVIDIA A100 PCIe")  # not an H100 PCIe's 756
    assert unknown.startswith("NVIDIA A100 PCIe: no fp16 peak known for it")
    assert f"| {tflops_b1:.0f} | - |" in unknown
