"""The CUDA kernels' own source (plugins/mra_attention/mraAttentionKernels.cu), run on the CPU under
plugins/tests/cuda_emulation, against the PyTorch reference.

This is what CI can check of the kernels without a GPU: their indexing, tiling, masking, barriers,
warp shuffles, tensor-core fragments, radix select, tie rule and epilogue, under several thread
schedules.
It says nothing of their speed, of tensor-core rounding, of FMA contraction or of the device's
expf; tests/test_cuda_kernels.py and tools/gpu_check.py check those on a GPU.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mra_export import native
from mra_export.attention import mra_attention, selected_blocks
from mra_export.fenced_memory import SIDES
from mra_export.kernel_check import compare_with_reference

from .conftest import random_qkv, ragged_mask
from .test_cpu_reference import (CASES, TOLERANCE, assert_exact_ties_go_to_the_lower_flat_index,
                                 assert_head_dim_and_logit_scale,
                                 assert_matches_pytorch_with_ragged_and_empty_masks,
                                 assert_token_major_layout_is_the_same_attention, check)

SCHEDULES = [0, 1, 2, 7]  # lowest thread first, highest first, two random ones
HALF_TOLERANCES = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative, as on a GPU


@pytest.fixture(autouse=True)
def lowest_thread_first_fenced_after_on_132_sms(emulated_kernels):
    """Each test starts, and leaves the library, on schedule 0 with the page after each buffer,
    on an emulated GPU of 132 SMs (an H200's)."""
    def reset():
        emulated_kernels.set_schedule(0)
        emulated_kernels.set_fence("after")
        emulated_kernels.set_multiprocessors(132)

    reset()
    yield
    reset()


@pytest.mark.parametrize("seq_len,num_blocks,mode,priors", CASES)
def test_matches_pytorch_with_ragged_and_empty_masks(emulated_kernels, seq_len, num_blocks, mode,
                                                     priors):
    """The C++ twin's grid (tests/test_cpu_reference.py): lengths 1-257, num_blocks below and
    above nb and nb**2, both modes, priors, an all-padding sample; same blocks, <= 1e-5."""
    assert_matches_pytorch_with_ragged_and_empty_masks(emulated_kernels, seq_len, num_blocks, mode,
                                                       priors)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_head_dims_and_logit_scales(emulated_kernels, head_dim, scale):
    assert_head_dim_and_logit_scale(emulated_kernels, head_dim, scale)


@pytest.mark.parametrize("multiprocessors", [132, 1])
def test_more_than_128_blocks_per_row(emulated_kernels, multiprocessors):
    """Past 4096 tokens the low-resolution term and the selection's scans take several chunks
    of their thread blocks (nb = 132 > 128 threads; 17424 cells > 1024 threads). On 132 SMs a
    row's selection is split over a cluster of CTAs; on 1 it has one CTA, whose threads each hold
    more cells than the 32 they keep in registers (as on sm_80 to sm_89, which have no clusters,
    past 4096 tokens)."""
    emulated_kernels.set_multiprocessors(multiprocessors)
    q, k, v = random_qkv(1, 1, 4200, 32, seed=42)
    mask = ragged_mask(1, 4200, [4150])
    assert check(emulated_kernels, q, k, v, mask, num_blocks=4 * 132) <= TOLERANCE


@pytest.mark.parametrize("seq_len,lengths", [(2048, [2048, 1500]), (4096, [4096])])
def test_selection_at_the_bench_lengths(emulated_kernels, seq_len, lengths):
    """At 2048 and 4096 tokens (nb = 64, 128) every selection thread's run of cells starts
    16-byte aligned, so its logits come in 16-byte loads: PyTorch's blocks, 8 per row."""
    q, k, v = random_qkv(len(lengths), 2, seq_len, 32, seed=seq_len)
    mask = ragged_mask(len(lengths), seq_len, lengths)
    assert check(emulated_kernels, q, k, v, mask, num_blocks=8 * (seq_len // 32)) <= TOLERANCE


def test_exact_ties_go_to_the_lower_flat_index(emulated_kernels):
    assert_exact_ties_go_to_the_lower_flat_index(emulated_kernels)


def test_ties_cut_in_a_later_cta_of_the_cluster(emulated_kernels):
    """A row's cells are split over its cluster's CTAs in rank order, 512 a CTA here (one a
    thread), so the first tied cells in flat order may all lie in CTA 0 and the cut in CTA 1:
    CTA 1 must rank its ties after CTA 0's. A zero query ties all 23 x 23 cells; 520 are taken,
    those of the lowest flat indices."""
    _, k, v = random_qkv(1, 1, 736, 32, seed=5)
    q = torch.zeros_like(k)
    mask = torch.ones(1, 736)
    emulated_kernels.take_largest_cluster()
    _, selected = emulated_kernels.attention(q, k, v, mask, num_blocks=520)
    assert emulated_kernels.take_largest_cluster() > 1  # one row on 132 SMs: a cluster
    assert selected.tolist() == [list(range(520))]
    assert check(emulated_kernels, q, k, v, mask, num_blocks=520) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_half_precision_tensor_core_path(emulated_kernels, dtype, head_dim):
    """fp16 and bf16 take the tensor-core path (mma.sync; weights rounded to the storage type before P.V)."""
    q, k, v = (t.to(dtype) for t in random_qkv(3, 2, 200, head_dim, seed=head_dim))
    mask = ragged_mask(3, 200, [200, 120, 0])
    for kw in (dict(num_blocks=20, approx_mode="full", initial_prior_diagonal_n_blocks=3),
               dict(num_blocks=6, approx_mode="sparse")):  # rows with no block at all
        ours, selected = emulated_kernels.attention(q, k, v, mask, **kw)
        assert ours.dtype == dtype
        result = compare_with_reference(ours, selected, q, k, v, mask, relative=True,
                                        tolerance=HALF_TOLERANCES[dtype], **kw)
        assert result.passed and result.same_blocks, result.summary()


# Threads per high-resolution CTA, unsplit and split: 2 warps (fp16/bf16) or 4 (fp32) a group; fp32
# at head_dim 128 does not split (2 groups' stages would pass sm_86's 99 KB of shared memory).
GROUP_THREADS = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 128}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_key_blocks_split_over_two_thread_groups_or_not(emulated_kernels, dtype, head_dim):
    """Where its CTAs would fill the GPU's slots fewer than 3 times over (40 CTAs here: on 132
    SMs), the high-resolution kernel splits each query block's key blocks over 2 thread groups
    and merges their sums; on 1 SM it keeps one group. Both select PyTorch's blocks and give its
    attention: query blocks of 0 to 9 key blocks (so a group may idle in a round, or have no
    block at all), a ragged mask, both modes."""
    q, k, v = (t.to(dtype) for t in random_qkv(2, 2, 300, head_dim, seed=head_dim + 1))
    mask = ragged_mask(2, 300, [300, 170])
    relative = dtype != torch.float32
    tolerance = HALF_TOLERANCES[dtype] if relative else TOLERANCE
    threads = {}
    for multiprocessors in (132, 1):
        emulated_kernels.set_multiprocessors(multiprocessors)
        for kw in (dict(num_blocks=40, approx_mode="full", initial_prior_diagonal_n_blocks=1),
                   dict(num_blocks=5, approx_mode="sparse")):
            ours, selected = emulated_kernels.attention(q, k, v, mask, **kw)
            threads[multiprocessors] = emulated_kernels.last_launch_threads()
            result = compare_with_reference(ours, selected, q, k, v, mask, relative=relative,
                                            tolerance=tolerance, **kw)
            assert result.passed and result.same_blocks, (multiprocessors, result.summary())
    group = GROUP_THREADS[dtype]
    splits = dtype != torch.float32 or head_dim <= 64
    assert threads == {132: 2 * group if splits else group, 1: group}


def scores_by_key_block(levels: dict[int, list[float]], heads: int, seed: int):
    """q, k, v [1, heads, 128, 64] (4 blocks): in every head, query row r's scores with key
    block b's keys are levels[r][b] (0 for rows not named), plus noise under 0.05."""
    q, k, v = random_qkv(1, heads, 128, 64, seed=seed)
    q, k = 0.03 * q, 0.03 * k
    q[..., :4] = 0.0
    for row, row_levels in levels.items():
        q[..., row, :4] = 8.0 * torch.tensor(row_levels)  # over sqrt(64)
    k[..., :4] = torch.eye(4).repeat_interleave(32, dim=0)  # dim b: 1 in key block b
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_lazy_softmax_base_moves_only_past_its_slack(emulated_kernels, dtype):
    """The 16-bit kernels move a row's softmax base only where a key block's real scores pass it
    by more than kLazyBaseSlack (5.5), and a warp rescales its output where one of its 16 rows
    moved. Over 4 key blocks, row 5's scores rise by 4 (its base stays: weights up to e^4), then
    2 (it moves, alone in its warp), then stay; row 13's, the other row of row 5's threads, rise
    by 11.5 at block 1 alone, where row 5's base stays, then stay; row 40's fall and row 70's
    rise by 4.5 in all, so theirs never move after the first. 8 heads: 32 query blocks, each
    over two thread groups (132 SMs: blocks 0, 2 and 1, 3) or one (1 SM). In a trial each of
    these failed it: no rescale, a rescale only where all 16 rows moved, or only where a
    thread's first row did (unsplit), and (fp16) a slack of 12, where row 13's weights, e^11.5,
    pass fp16's 65504."""
    q, k, v = scores_by_key_block({5: [0, 4, 6, 6], 13: [0, 11.5, 11.5, 11.5], 40: [0, -3, -6, -9],
                                   70: [0, 1.5, 3, 4.5]}, heads=8, seed=3)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = torch.ones(1, 128)
    threads = set()
    for multiprocessors in (132, 1):
        emulated_kernels.set_multiprocessors(multiprocessors)
        for mode in ("sparse", "full"):
            kw = dict(num_blocks=16, approx_mode=mode)  # every block of the 4 x 4
            ours, selected = emulated_kernels.attention(q, k, v, mask, **kw)
            threads.add(emulated_kernels.last_launch_threads())
            result = compare_with_reference(ours, selected, q, k, v, mask, relative=True,
                                            tolerance=HALF_TOLERANCES[dtype], **kw)
            assert result.passed and result.same_blocks, (multiprocessors, mode, result.summary())
    assert threads == {2 * GROUP_THREADS[dtype], GROUP_THREADS[dtype]}  # split and not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_nothing_is_read_or_written_before_a_buffer(emulated_kernels, dtype, layout):
    """The tests here run the kernels on buffers that end against an unmapped page
    (mra_export/fenced_memory.py), so a global read or write past a buffer's end faults; this
    one (and some random problems) put the page before each buffer's start. A ragged batch with
    an all-padding sample, 300 tokens (a partial last block), both modes, query blocks split over
    two thread groups (132 SMs) and not (1 SM): PyTorch's blocks and attention, and no fault."""
    q, k, v = (t.to(dtype) for t in random_qkv(3, 2, 300, 64, seed=5))
    mask = ragged_mask(3, 300, [300, 0, 170])
    relative = dtype != torch.float32
    tolerance = HALF_TOLERANCES[dtype] if relative else TOLERANCE
    emulated_kernels.set_fence("before")
    for multiprocessors in (132, 1):
        emulated_kernels.set_multiprocessors(multiprocessors)
        for kw in (dict(num_blocks=40, approx_mode="full", initial_prior_first_n_blocks=1,
                        initial_prior_diagonal_n_blocks=2),
                   dict(num_blocks=5, approx_mode="sparse")):
            ours, selected = emulated_kernels.attention(q, k, v, mask, layout=layout, **kw)
            result = compare_with_reference(ours, selected, q, k, v, mask, relative=relative,
                                            tolerance=tolerance, **kw)
            assert result.passed and result.same_blocks, (multiprocessors, result.summary())


# A call with K and V of 128 tokens, then one with K and V of 64 told they have 128: it reads
# past their ends and writes nothing out of place (Q, the mask and so the output have 128).
READ_PAST_THE_END = """
import sys, torch
from mra_export import native
library = native.MraLibrary(sys.argv[1])
q, mask = torch.randn(1, 1, 128, 32), torch.ones(1, 128, dtype=torch.int32)
params = native.make_params((1, 1, 128, 32), torch.float32, num_blocks=4)
for tokens in (128, 64):
    library.run(params, q, q[:, :, :tokens].clone(), q[:, :, :tokens].clone(), mask)
    print(f"ran with K and V of {tokens} tokens", flush=True)
"""


def test_a_call_reading_past_its_buffers_faults(emulated_kernels):
    """The kernels run on fenced buffers: reading past the end of K and V faults, as
    compute-sanitizer's memcheck would report it on a GPU, instead of reading whatever lies
    there (without the fence, on this machine, the call ran to the end)."""
    run = subprocess.run([sys.executable, "-c", READ_PAST_THE_END, str(emulated_kernels.path)],
                         capture_output=True, text=True, timeout=300)
    assert "ran with K and V of 128 tokens" in run.stdout, run.stdout + run.stderr
    assert "of 64 tokens" not in run.stdout and run.returncode == -signal.SIGSEGV
    assert "outside the memory the emulation has names for" in run.stderr, run.stderr


@pytest.mark.parametrize("side", SIDES)
def test_each_workspace_section_lies_against_a_page_of_its_own(emulated_kernels, side):
    """Inside the workspace the emulated library fences each section as the caller fences each
    buffer (plugins/tests/cuda_emulation/fencedWorkspace.cpp): the selected blocks, the section
    callers read, end less than 16 bytes before a page ("after", the alignment of the kernels'
    widest access) or start on one ("before")."""
    page = mmap.PAGESIZE
    q, k, v = random_qkv(2, 3, 300, 64, seed=3)
    emulated_kernels.set_fence(side)
    for num_blocks in (5, 40):
        params = native.make_params(q.shape, q.dtype, num_blocks=num_blocks)
        _, workspace = emulated_kernels.run(params, q, k, v, ragged_mask(2, 300, [300, 170]))
        start = emulated_kernels.lib.mraSelectedBlocks(ctypes.byref(params), workspace.data_ptr())
        start -= workspace.data_ptr()
        end = start + 4 * 6 * min(num_blocks, 10 * 10)  # 2 x 3 rows, nb = 10
        if side == "after":
            assert start % 16 == 0 and -end % page == -(end - start) % 16, (start, end)
        else:
            assert start % page == 0, start
        assert len(workspace) >= end + page
    cpu = native.MraLibrary.cpu()
    assert emulated_kernels.workspace_size(params) >= cpu.workspace_size(params) + 11 * page


# A call, then one whose mask lies in the workspace: in the free page after the selected blocks'
# section, or on that section's first page (the first kernel, an ordinary launch, reads it
# there; the high-resolution kernel, a dependent one, reads it before its wait).
READ_THE_MASK_IN_THE_WORKSPACE = """
import ctypes, mmap, sys, torch
from mra_export import native
from mra_export.fenced_memory import FencedBuffers
library, place = native.MraLibrary(sys.argv[1]), sys.argv[2]
q, mask = torch.randn(1, 1, 128, 32), torch.ones(1, 128, dtype=torch.int32)
output = torch.empty_like(q)
params = native.make_params(q.shape, q.dtype, num_blocks=4)
size = library.workspace_size(params)
workspace = FencedBuffers().empty("workspace", torch.uint8, (size,), alignment=mmap.PAGESIZE)
base = workspace.data_ptr()
selected = library.lib.mraSelectedBlocks(ctypes.byref(params), base)
pages = {"a gap": -(-(selected + 4 * 4) // mmap.PAGESIZE) * mmap.PAGESIZE,
         "a section": selected // mmap.PAGESIZE * mmap.PAGESIZE}
for where, mask_pointer in (("its own", mask.data_ptr()), (place, pages[place])):
    pointers = [t.data_ptr() for t in (q, q, q)] + [mask_pointer, output.data_ptr(), base]
    library.check(library.lib.mraAttentionCuda(ctypes.byref(params), *pointers, size, None))
    print(f"ran with the mask in {where}", flush=True)
"""


def run_with_the_mask_in_the_workspace(library, place: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-c", READ_THE_MASK_IN_THE_WORKSPACE, str(library.path),
                          place], capture_output=True, text=True, timeout=300)
    assert "ran with the mask in its own" in run.stdout, run.stdout + run.stderr
    return run


def test_a_kernel_reading_a_workspace_gap_faults(emulated_kernels):
    """The pages between the workspace's sections are inaccessible while the kernels run: a
    read there faults, where on a GPU it would read the next section (without the fence the
    call ran to the end)."""
    run = run_with_the_mask_in_the_workspace(emulated_kernels, "a gap")
    assert "in a gap" not in run.stdout and run.returncode == -signal.SIGSEGV
    assert "CUDA emulation: thread 0 of block 0 touched" in run.stderr, run.stderr
    assert "in the workspace between selected and rowStart (a section overrun)" in run.stderr


def test_a_dependent_kernel_reading_a_section_before_its_wait_faults(emulated_kernels):
    """Each kernel after the first is a programmatic dependent launch: on a GPU it may start
    while the one before runs, so it may touch the workspace only after griddepcontrol.wait. The
    emulation keeps the sections inaccessible to it until then (emu::setAwaitedMemory): the
    high-resolution kernel's early read of a mask lying there faults, the first kernel's not."""
    run = run_with_the_mask_in_the_workspace(emulated_kernels, "a section")
    assert "in a section" not in run.stdout and run.returncode == -signal.SIGSEGV
    assert "in workspace section selected before griddepcontrol.wait" in run.stderr, run.stderr


def test_a_workspace_not_on_a_page_is_refused(emulated_kernels):
    """The sections are fenced by pages, so the emulated kernels want the workspace on one (a
    caller's bug here, not a user's: TensorRT and the CUDA kernels need 256 bytes)."""
    q = torch.randn(1, 1, 64, 32)
    params = native.make_params(q.shape, q.dtype, num_blocks=4)
    size = emulated_kernels.workspace_size(params)
    workspace = torch.empty(size + 2 * mmap.PAGESIZE, dtype=torch.uint8)
    off_page = (-workspace.data_ptr() % mmap.PAGESIZE) + 256 + workspace.data_ptr()
    mask = torch.ones(1, 64, dtype=torch.int32)
    pointers = [t.data_ptr() for t in (q, q, q, mask, torch.empty_like(q))] + [off_page]
    status = emulated_kernels.lib.mraAttentionCuda(ctypes.byref(params), *pointers, size, None)
    with pytest.raises(RuntimeError, match="workspace must start on a page"):
        emulated_kernels.check(status)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_real_keys_far_below_a_padded_key_maximum_do_not_underflow(emulated_kernels, dtype):
    """As in test_cuda_kernels.py: padded keys (logit 0) set M, real logits are -20; the kernels
    take the exponentials against the real keys' maximum, so fp16 weights do not vanish."""
    _, _, v = random_qkv(1, 2, 64, 64, seed=21)
    q, k = torch.zeros_like(v), torch.zeros_like(v)
    # Real logits 1 * -160 / sqrt(64) = -20: exp(-20) = 2e-9 is below fp16's least subnormal
    # (6e-8), so weights taken against M = 0 would be zero (equal weights that merely rounded
    # would cancel in the normalisation).
    q[..., 0], k[..., 0] = 1.0, -160.0
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = ragged_mask(1, 64, [40])
    kw = dict(num_blocks=4, approx_mode="sparse")
    ours, selected = emulated_kernels.attention(q, k, v, mask, **kw)
    result = compare_with_reference(ours, selected, q, k, v, mask, tolerance=2e-3, relative=True,
                                    **kw)
    assert result.passed, result.summary()
    # The reference's own result is about 0.037 here, not V's average: its normaliser's 1e-6
    # outweighs the rows' 32 weights of exp(-20). Weights that vanished would give zeros.
    assert ours[0, :, :40].float().abs().amax().item() > 0.03


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_are_rounded_to_nearest(emulated_kernels, dtype):
    """The outputs' last rounding, float32 to fp16 or bf16: against float64 attention their errors
    go up as often as down, in units in the last place (ulp). Rounding toward zero would put
    their mean near -0.5 ulp; the weights' own rounding only adds noise of mean zero."""
    q, k, v = (t.to(dtype) for t in random_qkv(2, 2, 256, 64, seed=5))
    mask = ragged_mask(2, 256, [256, 200])
    ours, selected = emulated_kernels.attention(q, k, v, mask, num_blocks=16)
    assert torch.equal(selected, selected_blocks(q.float(), k.float(), mask, num_blocks=16))
    exact = mra_attention(q.double(), k.double(), v.double(), mask, num_blocks=16)
    real = exact.abs() > 1e-3  # far from the subnormals, and from rows of zeros
    ulp = torch.exp2(torch.floor(torch.log2(exact[real].abs()))) * torch.finfo(dtype).eps
    signed = (ours.double()[real] - exact[real]) * exact[real].sign() / ulp
    assert real.sum() > 50_000 and abs(signed.mean().item()) < 0.15, signed.mean().item()


def test_rows_whose_logits_are_all_below_minus_1e5_keep_the_floor(emulated_kernels):
    _, _, v = random_qkv(1, 2, 64, 64, seed=11)
    q, k = torch.zeros_like(v), torch.zeros_like(v)
    q[..., 0], k[..., 0] = 1000.0, -1500.0  # every logit -1.875e5
    mask = torch.ones(1, 64)
    for mode in ("full", "sparse"):
        assert check(emulated_kernels, q, k, v, mask, num_blocks=4, approx_mode=mode) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_token_major_layout_is_the_same_attention(emulated_kernels, dtype, head_dim):
    """Block means, the 16-byte tile loads and the output stores at the [B, S, H, D] strides."""
    assert_token_major_layout_is_the_same_attention(emulated_kernels, dtype, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_thread_schedule_gives_the_same_bits(emulated_kernels, dtype):
    """A barrier missing between a write to shared memory and another thread's read of it
    changes the result under one schedule or another (each one, removed, did in a trial)."""
    q, k, v = (t.to(dtype) for t in random_qkv(3, 2, 150, 64, seed=8))
    mask = ragged_mask(3, 150, [150, 70, 0])
    for kw in (dict(num_blocks=16, approx_mode="full", initial_prior_first_n_blocks=1,
                    initial_prior_diagonal_n_blocks=3),
               dict(num_blocks=4, approx_mode="sparse")):
        results = []
        for schedule in SCHEDULES:
            emulated_kernels.set_schedule(schedule)
            results.append(emulated_kernels.attention(q, k, v, mask, **kw))
        first_output, first_selected = results[0]
        expected = mra_attention(q.float(), k.float(), v.float(), mask, **kw)
        assert (first_output.float() - expected).abs().max().item() <= (
            TOLERANCE if dtype == torch.float32 else 2e-3 * expected.abs().max().item())
        for output, selected in results[1:]:
            assert torch.equal(output, first_output) and torch.equal(selected, first_selected)


@pytest.mark.parametrize("seq_len,lengths,num_blocks", [(2048, [2048, 1100], 8 * 64),
                                                         (1500, [1500, 0], 2 * 47)])
def test_every_cluster_size_gives_the_same_blocks_and_bits(emulated_kernels, seq_len, lengths,
                                                           num_blocks):
    """The selection splits a row's cells over a cluster of 1, 2, 4 or 8 CTAs, as the rows leave
    SMs free (4 rows here: 4, 8, 16 and 32 SMs) and each size shortens the threads' runs of
    cells (4096 cells at 2048 tokens; 2209 at 1500, where a cluster of 8 leaves its last three
    CTAs without a cell): each size selects PyTorch's blocks and gives the same bits where the
    high-resolution kernel splits its query blocks alike (at 32 SMs it splits them, which sums
    in another order). Each size runs lowest thread first, highest first and in a random order.
    Highest first runs a cluster's last CTA first, so a CTA that reads the counts of the CTAs
    before it too early (before the cluster's barrier) or too late (after one exited) fails
    here. Lowest first alone passed with the cluster.sync before the taken cells are summed
    removed."""
    q, k, v = random_qkv(len(lengths), 2, seq_len, 64, seed=seq_len)
    mask = ragged_mask(len(lengths), seq_len, lengths)
    kw = dict(num_blocks=num_blocks, approx_mode="full", initial_prior_first_n_blocks=1,
              initial_prior_diagonal_n_blocks=2)
    expected = mra_attention(q, k, v, mask, **kw)
    selection = {name: value for name, value in kw.items() if name != "approx_mode"}
    expected_selected = selected_blocks(q, k, mask, **selection).to(torch.int32)
    results = []
    # The library asks what clusters the GPU runs at its first launch in the process (the
    # emulated one: as many as its SMs allow): a first launch at 4 SMs would rule out 8, so one
    # at the fixture's 132 comes first.
    emulated_kernels.attention(q, k, v, mask, **kw)
    clusters = []
    for multiprocessors in (4, 8, 16, 32):
        emulated_kernels.set_multiprocessors(multiprocessors)
        for schedule in (0, 1, 7):
            emulated_kernels.set_schedule(schedule)
            emulated_kernels.take_largest_cluster()
            output, selected = emulated_kernels.attention(q, k, v, mask, **kw)
            results.append((output, selected, emulated_kernels.last_launch_threads()))
            clusters.append(emulated_kernels.take_largest_cluster())
    assert clusters == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3
    first_output = {}  # by the high-resolution kernel's threads: split or not
    for output, selected, threads in results:
        assert torch.equal(selected, expected_selected)
        assert (output - expected).abs().max().item() <= TOLERANCE
        assert torch.equal(output, first_output.setdefault(threads, output))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 2), seq_len=st.integers(1, 150),
       head_dim=st.sampled_from([32, 64, 128]), num_blocks=st.integers(1, 40),
       mode=st.sampled_from(["full", "sparse"]), first=st.integers(0, 2),
       diagonal=st.integers(0, 4), schedule=st.sampled_from(SCHEDULES),
       fence=st.sampled_from(SIDES), seed=st.integers(0, 10_000), data=st.data())
def test_random_problems(emulated_kernels, batch, heads, seq_len, head_dim, num_blocks, mode,
                         first, diagonal, schedule, fence, seed, data):
    """Under a drawn schedule, with each buffer fenced after its end or before its start."""
    lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch))
    q, k, v = random_qkv(batch, heads, seq_len, head_dim, seed=seed)
    mask = ragged_mask(batch, seq_len, lengths)
    emulated_kernels.set_schedule(schedule)
    kw = dict(num_blocks=num_blocks, approx_mode=mode, initial_prior_first_n_blocks=first,
              initial_prior_diagonal_n_blocks=diagonal)
    emulated_kernels.set_fence(fence)
    assert check(emulated_kernels, q, k, v, mask, **kw) <= TOLERANCE


def test_the_emulation_checks_itself(emulated_kernels):
    """plugins/tests/cuda_emulation/emulationSelfTest.cpp: shuffles, ballots, mma.sync, ldmatrix,
    CUB's block collectives and barriers against known answers, and a failed launch (not a hang or a wrong
    answer) where a GPU would hang or be undefined."""
    program = native.ensure_built("mra_cuda_emulation_test", "mra_cuda_emulation_test")
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" passed, 0 failed")
