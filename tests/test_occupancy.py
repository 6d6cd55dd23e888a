"""How many CTAs of each kernel an SM holds on each architecture built, without a GPU
(tools/occupancy.py): NVIDIA's occupancy calculator (cuda_occupancy.h, in
plugins/tests/occupancyCalculator.cpp) over the built library's registers and static shared
memory and the emulated launches' threads and dynamic shared memory. Needs the CUDA library and
the calculator (make plugins with nvcc), cuobjdump (make setup) and the memory-counts driver."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import built_or_skip, cuda_architectures_named, disassembly_tools_or_skip, load_tool, program_or_skip

occupancy = load_tool("occupancy")
memory_counts = occupancy.memory_counts


def ask(lines: list[str]) -> list[str]:
    calculator = built_or_skip(occupancy.CALCULATOR)
    result = subprocess.run([str(calculator)], input="\n".join(lines) + "\n", capture_output=True,
                            text=True, check=True, timeout=60)
    return result.stdout.splitlines()


def test_the_calculator_answers_as_the_programming_guides_limits_do():
    # "<sm> <registers> <static shared> <threads> <dynamic shared>" -> CTAs an SM, then the limits
    # by warps, registers, shared memory, CTAs an SM and barriers (-1: none).
    answers = ask(["90 32 0 256 0",  # 2048 threads an SM: 8 CTAs of 256
                   "90 128 0 128 0",  # 65536 registers: 4 CTAs of 128 threads x 128
                   "86 32 0 128 32768",  # 100 KB an SM, 1 KB more a CTA: 3 of 33 KB
                   "89 16 0 32 0",  # sm_89's 24 CTAs an SM
                   "90 32 0 64 32256",  # 32256 + 1024 = 33280 bytes, 7 in 228 KB ...
                   "90 32 0 64 32268",  # ... 12 more round up to 33408 (128-byte steps): 6
                   "90 32 0 128 232449",  # past the 227 KB a CTA may opt in to: none
                   "75 32 0 128 0"])
    ctas = [line.split()[0] for line in answers]
    assert ctas == ["8", "4", "3", "24", "7", "6", "0", "error"]
    assert answers[1].split()[2] == "4"  # bound by registers
    assert answers[2].split()[3] == "3"  # bound by shared memory
    assert "sm_75" in answers[7]


@pytest.fixture(scope="module")
def library():
    """The built CUDA library (skips where it, the calculator, the driver, cuobjdump or c++filt is
    missing)."""
    from mra_export import native

    built_or_skip(occupancy.CALCULATOR)
    program_or_skip(memory_counts.PROGRAM, "MRA_HAVE_ACCESS_HOOKS", "-fsanitize=kernel-address hooks")
    disassembly_tools_or_skip(occupancy.sass_accesses, binaries=("cuobjdump", "c++filt"))
    return built_or_skip(native.CUDA_LIBRARY)


@pytest.fixture(scope="module")
def recorded(library) -> tuple:
    """The driver's launches and the emulated occupancy queries' answers."""
    return memory_counts.run_launches("attention")


@pytest.fixture(scope="module")
def table(library, recorded) -> list:
    return occupancy.rows(library, recorded[0])


def needs_sm_90(table):
    if "sm_90" not in table[0].occupancy:
        pytest.skip("the CUDA library was built without sm_90 (MRA_CUDA_ARCHITECTURES)")


def test_every_kernel_the_problems_launch_fits_every_architecture_built_or_skip(table):
    assert len(table) >= 25  # every kernel, each launch shape
    assert sorted(table[0].occupancy) == cuda_architectures_named()
    unfit = [f"{row.launch.function} on {arch}" for row in table
             for arch, answer in row.occupancy.items() if answer.ctas < 1]
    assert not unfit


def test_a_cubins_static_shared_memory_is_the_same_on_every_architecture(table):
    """The reserve taken off sm_90's cubins (the driver's kilobyte a CTA, which it adds itself)
    leaves what the other architectures' cubins carry: ptxas's own figure."""
    for row in table:
        assert len({r.static_shared for r in row.resources.values()}) == 1, row.launch.function


def test_the_16_bit_head_dim_64_kernel_fits_7_ctas_an_h200_sm(table):
    """Its 3 stages' (K, V) tiles and the query tile, nothing more: the stages' key masks lie in
    the tiles' row pads. A 12-byte word of them beside the tiles (before 2026-12-06) rounded the
    CTA to 33408 bytes of shared memory, one too many for 7 in 228 KB."""
    needs_sm_90(table)
    tiles = (1 + 2 * 3) * 32 * (64 + 8) * 2  # query tile + 3 stages of K and V, rows padded by 8
    kernels = [row for row in table
               if row.launch.function in ("highResolutionMma<__half, 64, 1>", "highResolutionMma<__nv_bfloat16, 64, 1>")]
    assert len(kernels) == 2
    for row in kernels:
        assert row.launch.dynamic_shared == tiles
        assert row.occupancy["sm_90"].ctas == 7
        assert "shared memory" in row.occupancy["sm_90"].bound_by


def test_the_emulated_gpu_answers_the_split_decision_as_an_h200_would(library, recorded, table):
    """launchHighResolution splits where the unsplit kernel's CTAs an SM fill the GPU fewer than 3
    times: the emulation answers that query by threads and shared memory alone, an H200 (the
    calculator, sm_90) with the kernel's registers too. Equal answers: the emulated problems take
    the path a GPU would. (The split kernels' own answers, asked as they are opted in, decide
    nothing; registers bind some of them below the emulation's.)"""
    needs_sm_90(table)
    registers = occupancy.resources(library, "sm_90")
    deciding = [a for a in recorded[1] if a.function.startswith("highResolution") and a.function.endswith(", 1>")]
    assert len(deciding) == 9  # fp32, fp16 and bf16 at head_dim 32, 64 and 128
    gpu = occupancy.calculate([("sm_90", registers[a.function], a.threads, a.dynamic_shared) for a in deciding])
    differing = [f"{a.function}: emulated {a.ctas}, sm_90 {answer.ctas} ({answer.bound_by})"
                 for a, answer in zip(deciding, gpu) if a.ctas != answer.ctas]
    assert not differing, "\n".join(differing)
