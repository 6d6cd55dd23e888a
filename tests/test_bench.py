"""``mra-export bench`` end to end, on small shapes so that it takes seconds.

The speed targets themselves are met in the recorded full run (tools/results/), not here.
"""

from __future__ import annotations

import json

import pytest

from mra_export.bench import models
from mra_export.bench.cli import run_bench
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
    assert ran == {"mra pytorch", "mra onnxruntime", "dense pytorch", "dense onnxruntime"}
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


def test_targets_are_the_ratios_of_the_measured_cells(bench_run):
    _, run = bench_run
    cell = {(r["length"], name): res for r in run["results"] if r["batch"] == 1
            for name, res in r["backends"].items()}
    speedup = cell[4096, "mra pytorch"]["median_s"] / cell[4096, "mra onnxruntime"]["median_s"]
    versus_dense = cell[4096, "mra onnxruntime"]["median_s"] / cell[4096, "dense onnxruntime"]["median_s"]
    growth = cell[4096, "mra onnxruntime"]["median_s"] / cell[512, "mra onnxruntime"]["median_s"]
    values = [t["value"] for t in run["targets"]]
    assert values[:3] == pytest.approx([speedup, versus_dense, growth])
    assert [t["met"] for t in run["targets"][:3]] == [speedup >= 2, versus_dense <= 0.6, growth <= 10]


def test_bad_lengths_are_one_line_errors(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "b"), "--lengths", "4097"]) == 2
    assert main(["bench", "--out", str(tmp_path / "b"), "--batches", "one"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--lengths must be within 1..4096" in errors[0]
    assert not (tmp_path / "b").exists()
