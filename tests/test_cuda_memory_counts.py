"""Shared-memory bank conflicts and global-memory sectors without a GPU: the CUDA kernels' source
under the CUDA emulation with every load and store hooked
(plugins/tests/cuda_emulation/memoryCounts.cpp). Each warp-wide shared-memory instruction's
wavefronts and each global one's 32-byte sectors are counted by the CUDA C++ Programming
Guide's rules, as Nsight Compute counts them (tools/memory_counts.py prints the tables). The
same hooks fail a launch whose kernel reads or writes memory named an overrun: the gaps between
the workspace's sections, to the byte (the emulation's fences see whole pages, its canaries
writes only).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import load_tool, program_or_skip

memory_counts = load_tool("memory_counts")

# The driver's shared-memory patterns, one warp each: (wavefronts, ideal) of the one
# instruction, by the guide's rule (32 banks of 4-byte words; 128 bytes a phase: the warp for up
# to 4-byte accesses, half warps for 8-byte ones, quarter warps for 16-byte ones and ldmatrix's
# 8x8 matrices).
SHARED_PATTERNS = {
    "loadWords<0>": (1, 1),  # every lane the same word: one broadcast
    "loadWords<1>": (1, 1),
    "loadWords<2>": (2, 1),  # lanes l and l + 16 in one bank
    "loadWords<32>": (32, 1),  # every lane in bank 0
    "loadWords<33>": (1, 1),  # a row of 33 words: the classic padding
    "storeWords<2>": (2, 1),
    "loadBytes": (1, 1),  # 32 bytes: 8 words in 8 banks
    "loadDoubles": (2, 2),  # two half warps of 128 bytes
    "loadVectors<1>": (4, 4),  # four quarter warps of 128 bytes
    "loadVectors<2>": (8, 4),  # 32 bytes apart: lanes l and l + 4 of a quarter warp in one bank
    "loadMatrixRows<64>": (32, 4),  # ldmatrix, rows 128 bytes apart: a matrix's 8 rows in 4 banks
    "loadMatrixRows<72>": (4, 4),  # rows 144 bytes apart, as the kernels pad them
    "copyVectors<1>": (4, 4),  # cp.async of 16 bytes: its stores as a 16-byte store's
    "copyVectors<8>": (32, 4),  # 128 bytes apart: a quarter warp's 8 copies in the same 4 banks
}
# Its global-memory patterns' loads (stores, for storeGlobalWords): (sectors, ideal), 32-byte
# sectors of a 128-byte aligned buffer; ideal, as many as the lanes' bytes fill.
GLOBAL_PATTERNS = {
    "loadGlobalWords<0>": (1, 1),  # every lane the same float
    "loadGlobalWords<1>": (4, 4),  # 128 bytes in a row
    "loadGlobalWords<2>": (8, 4),  # every other float: each sector half used
    "loadGlobalWords<8>": (32, 4),  # a float a sector
    "loadGlobalVectors<0>": (16, 16),  # 512 bytes in a row
    "loadGlobalVectors<4>": (17, 16),  # the same, 16 bytes past a sector's start
    "storeGlobalWords<32>": (32, 4),
}


def counts(what: str) -> list:
    """The driver's counts, located (skips where GCC has no -fsanitize=kernel-address hooks)."""
    program_or_skip(memory_counts.PROGRAM, "MRA_HAVE_ACCESS_HOOKS", "-fsanitize=kernel-address hooks")
    return memory_counts.run(what)


@pytest.fixture(scope="module")
def attention() -> list:
    return counts("attention")


def test_the_counts_follow_the_guides_rules_on_known_patterns():
    patterns = counts("patterns")
    shared = {i.function: i for i in patterns if i.space == "shared"}
    assert set(shared) == set(SHARED_PATTERNS)
    for function, (wavefronts, ideal) in SHARED_PATTERNS.items():
        instruction = shared[function]
        assert instruction.requests == 1, function
        assert (instruction.taken, instruction.ideal) == (wavefronts, ideal), function
    assert shared["loadMatrixRows<64>"].worst == 8  # 8 rows, one group of 4 banks
    assert shared["loadVectors<1>"].access == "load 16"
    assert shared["storeWords<2>"].access == "store 4"
    # The global patterns: their loads (or stores), not the other side of `out[lane] = ...`.
    tested = {i.function: i for i in patterns if i.space == "global"
              and i.store == i.function.startswith("store")}
    assert set(tested) == set(GLOBAL_PATTERNS)
    for function, (sectors, ideal) in GLOBAL_PATTERNS.items():
        assert (tested[function].taken, tested[function].ideal) == (sectors, ideal), function


def test_every_kernel_ran_with_its_memory_counted(attention):
    shared = {i.function for i in attention if i.space == "shared"}
    for kernel in ("lowResolutionLogits", "lowResolutionTerms", "selectBlocks",
                   "highResolutionMma<__half, 64, 1>", "highResolutionMma<__half, 64, 2>",
                   "highResolutionMma<__nv_bfloat16, 128, 1>", "highResolutionMma<__half, 32, 1>",
                   "highResolutionFma<64, 1>", "highResolutionFma<64, 2>", "highResolutionFma<128, 1>"):
        assert kernel in shared, kernel
    in_global = {i.function.split("<")[0] for i in attention if i.space == "global"}
    assert {"blockMeans", "lowResolutionLogits", "lowResolutionTerms", "selectBlocks",
            "copyTiles", "storeOutputTile"} <= in_global
    # Each ldmatrix call site counted where it is (not in one out-of-line copy of the stand-in).
    matrix_loads = [i for i in attention if i.chain and i.chain[-1].startswith("ptxMma.h")]
    assert matrix_loads and all(i.function.startswith("highResolutionMma<") for i in matrix_loads)
    sites = {i.chain for i in matrix_loads if i.function == "highResolutionMma<__half, 64, 1>"}
    assert len(sites) == 3  # Q's, K's and V's


def is_digit_histogram(instruction) -> bool:
    """The selection's atomics on its digit histogram: which bins the keys fall in is the data's
    (and same-bin atomics serialise on a GPU in ways the rule does not count)."""
    return instruction.function == "selectBlocks" and any(
        where.startswith("cudaEmulation.h") for where in instruction.chain)  # the stand-in's atomicAdd


def test_the_kernels_shared_memory_is_free_of_bank_conflicts(attention):
    conflicts = [f"{i.function} {memory_counts.kernel_lines(i)} {i.access}: {i.taken} "
                 f"wavefronts for {i.ideal}"
                 for i in attention if i.space == "shared" and i.excess > 0 and not is_digit_histogram(i)]
    assert not conflicts, "\n".join(conflicts)
    # The main loops' instructions are among those counted: many requests, no excess.
    busiest = max((i for i in attention if i.function == "highResolutionMma<__half, 64, 1>"
                   and i.space == "shared"), key=lambda i: i.requests)
    assert busiest.requests >= 1000 and busiest.excess == 0
    # The head_dim-32 tensor-core tiles' copies in and out (4 vectors a row, tileRow's order).
    head_dim_32 = ("highResolutionMma<__half, 32,", "copyTiles<__half, 32,", "storeOutputTile<__half, 32>")
    tile_copies = [i for i in attention if i.space == "shared" and i.function.startswith(head_dim_32)
                   and i.bytes == 16]
    assert len(tile_copies) >= 3 and all(i.taken == i.ideal for i in tile_copies)


def test_the_high_resolution_kernels_move_whole_sectors(attention):
    """Every global access of the high-resolution kernels (the tiles' copies in, the outputs'
    stores, the mask's words, the low-resolution terms: the fp32 epilogue reads a thread's 4
    dims in one load, LowResolution::out4) and the block means' reads of Q, K and V take as many
    sectors as their bytes fill, on 256-byte aligned buffers as a GPU's allocators give them."""
    high_resolution = ("highResolution", "copyTiles", "storeOutputTile", "realTokenBits")
    movers = [i for i in attention if i.space == "global" and (
        i.function.startswith(high_resolution) or (i.function.startswith("blockMeans") and not i.store))]
    assert len(movers) >= 20
    wasted = [f"{i.function} {memory_counts.kernel_lines(i)} {i.access}: {i.taken} sectors for {i.ideal}"
              for i in movers if i.excess > 0]
    assert not wasted, "\n".join(wasted)


def test_a_read_of_memory_named_an_overrun_fails_the_launch():
    """The driver names the 12 bytes after a buffer's first float an overrun, as the fenced
    workspace names the gaps beside its sections, and reads the second: a read that lands on
    mapped memory (a canary) and that only the hooks see. The attention's 19 problems above
    ran with their workspace's gaps so named, and read none."""
    program = program_or_skip(memory_counts.PROGRAM, "MRA_HAVE_ACCESS_HOOKS", "-fsanitize=kernel-address hooks")
    result = subprocess.run([str(program), "overrun"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"block 0: read 4 bytes at 0x[0-9a-f]+ past the one float of a test buffer", result.stderr)
