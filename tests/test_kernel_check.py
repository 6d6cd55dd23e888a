"""The comparison that judges the CUDA kernels (tools/gpu_check.py, test_cuda_kernels.py), checked on
the CPU: it passes the C++ twin, and it accepts a difference only at a real edge of MRA's output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mra_export.attention import mra_attention, selected_blocks
from mra_export.kernel_check import compare_with_reference

from .conftest import TOOLS, load_tool, random_qkv, ragged_mask

SETTINGS = dict(num_blocks=40, initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=3,
                approx_mode="full")


def on_step_inputs():
    """Every logit is exactly 0.5 (500 steps of 1e-3): each query's row max sits on a step."""
    q, k, v = random_qkv(1, 2, 512, 64, seed=3)
    q, k = torch.zeros_like(q), torch.zeros_like(k)
    q[..., 0], k[..., 0] = 1.0, 4.0  # 1 * 4 / sqrt(64)
    return q, k, v, torch.ones(1, 512)


def reference(q, k, v, mask, **settings):
    """``mra_attention``'s output and ``selected_blocks``' cells: what a perfect native call returns."""
    selection = {name: value for name, value in settings.items() if name != "approx_mode"}
    return mra_attention(q, k, v, mask, **settings), selected_blocks(q, k, mask, **selection)


def with_last_cell_swapped(selected: torch.Tensor) -> torch.Tensor:
    """Row 0's last selected cell replaced by the grid's last cell (255 of 16 x 16)."""
    assert 255 not in selected[0].tolist()
    swapped = selected.clone()
    swapped[0, -1] = 255
    return swapped


def with_error_at(output: torch.Tensor, queries, size: float) -> torch.Tensor:
    output = output.clone()
    for head, position in queries:
        output[0, head, position] += size
    return output


def test_the_cpu_twin_passes_with_no_edge_cases(cpu_library):
    q, k, v = random_qkv(3, 2, 300, 32, seed=5)
    mask = ragged_mask(3, 300, [300, 150, 0])
    output, selected = cpu_library.attention(q, k, v, mask, **SETTINGS)
    result = compare_with_reference(output, selected, q, k, v, mask, tolerance=1e-5, **SETTINGS)
    assert result.passed and result.same_blocks, result.summary()
    assert result.max_error <= 1e-5 and result.step_queries == 0


def test_an_error_off_any_edge_fails():
    q, k, v = random_qkv(1, 2, 512, 64, seed=3)
    mask = torch.ones(1, 512)
    expected, selected = reference(q, k, v, mask, **SETTINGS)
    exact = compare_with_reference(expected, selected, q, k, v, mask, tolerance=1e-5, **SETTINGS)
    assert exact.passed and exact.max_error == 0.0
    wrong = with_error_at(expected, [(1, 100)], 1e-4)
    result = compare_with_reference(wrong, selected, q, k, v, mask, tolerance=1e-5, **SETTINGS)
    assert not result.passed and result.max_error == pytest.approx(1e-4, rel=1e-2)


def test_a_rare_error_on_a_quantisation_step_is_accepted_and_counted():
    q, k, v, mask = on_step_inputs()
    expected, selected = reference(q, k, v, mask, num_blocks=40)
    largest = expected.abs().max().item()

    one = with_error_at(expected, [(0, 7)], 5e-4 * largest)
    result = compare_with_reference(one, selected, q, k, v, mask, tolerance=1e-5, num_blocks=40)
    assert result.passed and result.step_queries == 1 and result.max_error == 0.0

    two = with_error_at(expected, [(0, 7), (1, 9)], 5e-4 * largest)  # 2 of 1024: too many
    assert not compare_with_reference(two, selected, q, k, v, mask, tolerance=1e-5,
                                       num_blocks=40).passed
    large = with_error_at(expected, [(0, 7)], 1e-2 * largest)  # more than a step can move
    assert not compare_with_reference(large, selected, q, k, v, mask, tolerance=1e-5,
                                      num_blocks=40).passed


def test_a_different_selection_is_accepted_only_at_a_tie():
    q, k, v = random_qkv(1, 2, 512, 64, seed=3)
    mask = torch.ones(1, 512)
    expected, selected = reference(q, k, v, mask, num_blocks=40)
    swapped = with_last_cell_swapped(selected)  # far from the threshold here
    result = compare_with_reference(expected, swapped, q, k, v, mask, tolerance=1e-5,
                                    num_blocks=40)
    assert not result.passed and result.untied_blocks == 2 and result.tied_blocks == 0

    q, k, v, mask = on_step_inputs()  # constant logits: every score ties with the threshold
    expected, selected = reference(q, k, v, mask, num_blocks=40)
    swapped = with_last_cell_swapped(selected)
    result = compare_with_reference(expected, swapped, q, k, v, mask, tolerance=1e-5,
                                    num_blocks=40)
    assert result.tied_blocks == 2 and result.untied_blocks == 0 and not result.same_blocks


def test_gpu_check_says_in_one_line_that_it_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: tools/gpu_check.py would run for minutes")
    script = TOOLS / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible to PyTorch; run this on a machine with one (or with "
        "--emulated to check the kernels' logic on the CPU)"]


def test_gpu_check_refuses_an_unwritable_output_before_using_the_gpu(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--out",
                             str(tmp_path / "a-file" / "gpu_check.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"gpu_check.py: error: cannot write to {tmp_path / 'a-file'}: {tmp_path / 'a-file'} is "
        "not a writable folder; choose another output path")


@pytest.mark.parametrize("implementation", ["cpu_library", "emulated_kernels"])
def test_gpu_check_correctness_table_runs_without_a_gpu(implementation, request, capsys):
    """tools/gpu_check.py's correctness pass, end to end, with the C++ twin or the kernels' own
    source under the CPU CUDA emulation (what `gpu_check.py --emulated` runs) in place of the
    kernels: every kind of case it runs on a GPU (dtypes, head dims, priors, all-padding)."""
    library = request.getfixturevalue(implementation)
    gpu_check = load_tool("gpu_check")
    cases = [(3, 100, 64, dtype, mode, priors) for dtype in gpu_check.TOLERANCES
             for mode in ("full", "sparse") for priors in (False, True)]
    cases += [(2, 64, 32, torch.float32, "full", False), (2, 64, 128, torch.float16, "full", True)]
    rows = gpu_check.check_correctness(library, cases, device="cpu")
    gpu_check.print_correctness(rows)
    table = capsys.readouterr().out
    assert len(rows) == len(cases) and all(row["passed"] for row in rows), table
    assert table.count(" pass") == len(cases) and "FAIL" not in table


def test_gpu_check_refuses_a_missing_library_in_one_line(tmp_path):
    missing = tmp_path / "libmra_attention_cuda_emulated.so"
    result = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--emulated", "--library",
                             str(missing), "--out", str(tmp_path / "gpu_check.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"gpu_check.py: error: cannot load {missing} ({missing}: cannot open shared object file: "
        "No such file or directory); rebuild it with 'make plugins'")
    assert "Traceback" not in result.stderr
