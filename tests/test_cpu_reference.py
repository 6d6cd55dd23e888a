"""The C++ CPU reference of the plugin (through its C interface) against the PyTorch reference."""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mra_export.attention import mra_attention, selected_blocks
from mra_export.native import MraAttentionParams, make_params
from mra_export.transformers_reference import transformers_mra2_attention

from .conftest import random_qkv, ragged_mask

TOLERANCE = 1e-5


def check(lib, q, k, v, mask, **kw):
    ours, ours_selected = lib.attention(q, k, v, mask, **kw)
    expected = mra_attention(q, k, v, mask, **kw)
    kw.pop("approx_mode", None)
    expected_selected = selected_blocks(q, k, mask, **kw)
    assert torch.equal(ours_selected, expected_selected.to(torch.int32))
    return (ours.float() - expected.float()).abs().max().item()


CASES = list(itertools.product(
    [1, 31, 32, 100, 257],  # lengths: one token, partial and exact blocks
    [1, 3, 16, 40, 100],  # num_blocks, below and above nb and nb**2
    ["full", "sparse"],
    [(0, 0), (1, 0), (0, 3), (2, 5)],  # priors (first, diagonal)
))


@pytest.mark.parametrize("seq_len,num_blocks,mode,priors", CASES)
def test_matches_pytorch_with_ragged_and_empty_masks(cpu_library, seq_len, num_blocks, mode, priors):
    assert_matches_pytorch_with_ragged_and_empty_masks(cpu_library, seq_len, num_blocks, mode, priors)


def assert_matches_pytorch_with_ragged_and_empty_masks(lib, seq_len, num_blocks, mode, priors):
    """One case of CASES (also run on the emulated CUDA kernels)."""
    q, k, v = random_qkv(3, 2, seq_len, 32, seed=seq_len * 7 + num_blocks)
    mask = ragged_mask(3, seq_len, [seq_len, seq_len // 2, 0])  # the last sample is all padding
    kw = dict(num_blocks=num_blocks, approx_mode=mode, initial_prior_first_n_blocks=priors[0],
              initial_prior_diagonal_n_blocks=priors[1])
    assert check(lib, q, k, v, mask, **kw) <= TOLERANCE


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_head_dims_and_logit_scales(cpu_library, head_dim, scale):
    assert_head_dim_and_logit_scale(cpu_library, head_dim, scale)


def assert_head_dim_and_logit_scale(lib, head_dim, scale):
    """(Also run on the emulated CUDA kernels, for the head dims they take.)"""
    q, k, v = random_qkv(2, 2, 160, head_dim, seed=head_dim, scale=scale)
    mask = ragged_mask(2, 160, [160, 90])
    for mode in ("full", "sparse"):
        assert check(lib, q, k, v, mask, num_blocks=8, approx_mode=mode) <= TOLERANCE


@pytest.mark.parametrize("head_dim", [16, 64])
def test_very_large_logits_agree_to_float32_resolution(cpu_library, head_dim):
    """Logits of magnitude ~|P| are resolved by float32 only to |P| * 2**-24, so exp(P - M)
    and the output carry that relative error in any two implementations whose dot products
    round differently. Inputs scaled by 4 give |P| up to ~100: 1e-5 absolute is then below
    float32's own resolution, and the bound follows the conditioning instead."""
    q, k, v = random_qkv(2, 2, 160, head_dim, seed=head_dim, scale=4.0)
    mask = ragged_mask(2, 160, [160, 90])
    logits = (q @ k.transpose(-1, -2)).abs().max().item() / head_dim**0.5
    out = mra_attention(q, k, v, mask, num_blocks=8)
    bound = TOLERANCE + 8 * logits * 2**-24 * out.abs().max().item()
    assert logits > 50  # the regime this test is about
    for mode in ("full", "sparse"):
        assert check(cpu_library, q, k, v, mask, num_blocks=8, approx_mode=mode) <= bound


def test_exact_ties_go_to_the_lower_flat_index(cpu_library):
    assert_exact_ties_go_to_the_lower_flat_index(cpu_library)


def assert_exact_ties_go_to_the_lower_flat_index(lib):
    """(Also run on the emulated CUDA kernels.)"""
    # A zero query makes every low-resolution logit exactly 0, whatever the summation order (an
    # "identical blocks" input would not: BLAS rounds edge columns differently): all cells tie.
    _, k, v = random_qkv(1, 2, 192, 32, seed=3)
    q = torch.zeros_like(k)
    mask = torch.ones(1, 192)
    _, selected = lib.attention(q, k, v, mask, num_blocks=10)
    assert selected.tolist() == [list(range(10))] * 2
    for mode in ("full", "sparse"):
        assert check(lib, q, k, v, mask, num_blocks=10, approx_mode=mode) <= TOLERANCE
    # With priors the tied scores become 0, 5e3 and 1e4: ties within each level.
    assert check(lib, q, k, v, mask, num_blocks=14, initial_prior_first_n_blocks=1,
                 initial_prior_diagonal_n_blocks=3) <= TOLERANCE
    # Each row's maximum is exactly 0: with 4 < nb = 6 blocks, that tie group is cut.
    q2, k2, v2 = random_qkv(1, 2, 192, 32, seed=4)
    assert check(lib, q2, k2, v2, mask, num_blocks=4, approx_mode="sparse") <= TOLERANCE


@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_low_precision_storage(cpu_library, dtype, ulp):
    q, k, v = (t.to(dtype) for t in random_qkv(2, 2, 96, 64, seed=9))
    mask = ragged_mask(2, 96, [96, 50])
    ours, _ = cpu_library.attention(q, k, v, mask, num_blocks=6)
    assert ours.dtype == dtype
    exact = mra_attention(q.float(), k.float(), v.float(), mask, num_blocks=6)
    # Both compute in float32 from the same rounded inputs; only the output rounding differs.
    assert ((ours.float() - exact).abs() <= ulp * exact.abs() + 1e-6).all()
    # The twin computes its 16-bit attention in float32: its float32 result on the same inputs,
    # rounded to nearest even by PyTorch, bit for bit (a truncating store would be an ulp off);
    # values * 2**-20 are fp16 subnormals (below 6.1e-5), in and out.
    for values in (v, v * 2**-20):
        ours, _ = cpu_library.attention(q, k, values, mask, num_blocks=6)
        in_float32, _ = cpu_library.attention(q.float(), k.float(), values.float(), mask,
                                              num_blocks=6)
        assert torch.equal(ours, in_float32.to(dtype)) and ours.abs().max() > 0


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 2), seq_len=st.integers(1, 150),
       head_dim=st.sampled_from([8, 32, 64]), num_blocks=st.integers(1, 40),
       mode=st.sampled_from(["full", "sparse"]), first=st.integers(0, 2),
       diagonal=st.integers(0, 4), seed=st.integers(0, 10_000), data=st.data())
def test_random_problems(cpu_library, batch, heads, seq_len, head_dim, num_blocks, mode, first,
                         diagonal, seed, data):
    lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch))
    q, k, v = random_qkv(batch, heads, seq_len, head_dim, seed=seed)
    mask = ragged_mask(batch, seq_len, lengths)
    kw = dict(num_blocks=num_blocks, approx_mode=mode, initial_prior_first_n_blocks=first,
              initial_prior_diagonal_n_blocks=diagonal)
    assert check(cpu_library, q, k, v, mask, **kw) <= TOLERANCE


def test_invalid_parameters_and_small_workspace_return_statuses(cpu_library):
    lib = cpu_library.lib
    bad = MraAttentionParams(1, 1, 0, 32, 4, 32, 0, 0, 0, 0)  # seq_len 0
    assert lib.mraCheckParams(ctypes.byref(bad)) == 1
    assert lib.mraWorkspaceSize(ctypes.byref(bad)) == 0
    # batch * heads * seq_len * head_dim and batch * heads * nb * nb pass 2**63: they must not wrap
    # around into "fits".
    huge = MraAttentionParams(2**31 - 1, 2**31 - 1, 64, 4, 4, 32, 0, 0, 0, 0)
    assert lib.mraCheckParams(ctypes.byref(huge)) == 2
    assert lib.mraWorkspaceSize(ctypes.byref(huge)) == 0
    # The block grid alone past int32: nb = 2**16 blocks a row, nb**2 = 2**32 cells a head, while
    # the tensors (2**26 values) fit.
    wide_grid = MraAttentionParams(1, 1, 2**21, 32, 4, 32, 0, 0, 0, 0)
    assert lib.mraCheckParams(ctypes.byref(wide_grid)) == 2
    no_blocks = MraAttentionParams(1, 1, 64, 32, 0, 32, 0, 0, 0, 0)  # num_blocks 0
    assert lib.mraCheckParams(ctypes.byref(no_blocks)) == 1
    assert lib.mraWorkspaceSize(ctypes.byref(no_blocks)) == 0
    q = torch.zeros(1, 1, 64, 32)
    good = cpu_library.params(q, num_blocks=4)
    needed = lib.mraWorkspaceSize(ctypes.byref(good))
    assert needed > 0
    buffers = [ctypes.c_void_p(t.data_ptr()) for t in (q, q, q, torch.ones(1, 64, dtype=torch.int32), q)]
    small = torch.empty(needed - 1, dtype=torch.uint8)
    status = lib.mraAttentionCpu(ctypes.byref(good), *buffers, ctypes.c_void_p(small.data_ptr()),
                                 ctypes.c_size_t(needed - 1))
    assert status == 3 and lib.mraStatusString(status).startswith(b"workspace too small")
    with pytest.raises(RuntimeError, match="invalid argument"):
        cpu_library.attention(q, q, q, torch.ones(1, 64), num_blocks=4, approx_mode="full",
                              initial_prior_first_n_blocks=-1)


@pytest.mark.parametrize("shape", [(1, 1, 100, 32), (3, 2, 257, 64), (2, 12, 4100, 64)])
def test_workspace_sections_start_on_256_bytes(cpu_library, shape):
    """The CUDA kernels move workspace sections in 16-byte vectors, and TensorRT and onnxruntime
    hand out 256-byte aligned workspaces: each section starts on 256 bytes (the selected blocks'
    is the one the C interface names), and the whole is a multiple of 256."""
    lib = cpu_library.lib
    for dtype in (torch.float32, torch.float16):
        params = make_params(shape, dtype, num_blocks=7)
        assert lib.mraWorkspaceSize(ctypes.byref(params)) % 256 == 0
        selected = lib.mraSelectedBlocks(ctypes.byref(params), ctypes.c_void_p(0)) or 0
        assert selected > 0 and selected % 256 == 0


def assert_token_major_layout_is_the_same_attention(lib, dtype, head_dim):
    """Layout MRA_BSHD: Q, K, V and the output as [batch, seq, heads, head_dim] in memory (a
    projection split into heads). Every (batch, head) row reads and writes its own strided
    slices: the result is the [B, H, S, D] layout's, bit for bit, in that memory order."""
    q, k, v = (t.to(dtype) for t in random_qkv(2, 3, 150, head_dim, seed=head_dim))
    mask = ragged_mask(2, 150, [150, 61])
    kw = dict(num_blocks=12, approx_mode="full", initial_prior_first_n_blocks=1,
              initial_prior_diagonal_n_blocks=3)
    token_major, token_major_selected = lib.attention(q, k, v, mask, layout="bshd", **kw)
    head_major, head_major_selected = lib.attention(q, k, v, mask, **kw)
    assert token_major.transpose(1, 2).is_contiguous()  # written in the layout it was asked for
    assert torch.equal(token_major, head_major)
    assert torch.equal(token_major_selected, head_major_selected)
    expected = mra_attention(q.float(), k.float(), v.float(), mask, **kw)
    relative = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # storage rounding, as on a GPU
    tolerance = relative[dtype] * expected.abs().max().item() if dtype in relative else TOLERANCE
    assert (token_major.float() - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_major_layout_is_the_same_attention(cpu_library, dtype):
    assert_token_major_layout_is_the_same_attention(cpu_library, dtype, 64)


def test_an_unknown_layout_is_an_invalid_argument(cpu_library):
    params = cpu_library.params(torch.zeros(1, 1, 64, 32), num_blocks=4)
    params.layout = 2
    assert cpu_library.lib.mraCheckParams(ctypes.byref(params)) == 1


@pytest.mark.parametrize("field,value", [
    ("dtype", 3), ("approx_mode", 2), ("initial_prior_first_n_blocks", -1),
    ("initial_prior_diagonal_n_blocks", -1)])
def test_a_setting_out_of_range_is_an_invalid_argument(cpu_library, field, value):
    """The C interface checks every setting itself: the front ends refuse these first, but a
    direct caller's unknown dtype would be read as float32, an unknown mode run as "sparse"."""
    params = cpu_library.params(torch.zeros(1, 1, 64, 32), num_blocks=4)
    assert cpu_library.lib.mraCheckParams(ctypes.byref(params)) == 0
    setattr(params, field, value)
    assert cpu_library.lib.mraCheckParams(ctypes.byref(params)) == 1
    assert cpu_library.lib.mraWorkspaceSize(ctypes.byref(params)) == 0


def test_rows_whose_logits_are_all_below_minus_1e5_keep_the_kernels_floor(cpu_library):
    """The original's integer row max starts at -1e8, so M never goes below -1e5 (= -1e8 / 1e3):
    with every logit at -1.875e5 the high-resolution part then weighs exp(P - M) = 0."""
    _, _, v = random_qkv(1, 2, 64, 64, seed=11)
    q, k = torch.zeros_like(v), torch.zeros_like(v)
    q[..., 0], k[..., 0] = 1000.0, -1500.0  # every logit -1.5e6 / sqrt(64) = -1.875e5
    mask = torch.ones(1, 64)
    for mode in ("full", "sparse"):
        ours = mra_attention(q, k, v, mask, num_blocks=4, approx_mode=mode)
        theirs = transformers_mra2_attention(q, k, v, mask, num_blocks=4, approx_mode=mode,
                                             spec_ties=True)
        assert (ours - theirs.reshape(ours.shape)).abs().max().item() <= TOLERANCE
        assert check(cpu_library, q, k, v, mask, num_blocks=4, approx_mode=mode) <= TOLERANCE
    sparse = mra_attention(q, k, v, mask, num_blocks=4, approx_mode="sparse")
    assert sparse.abs().max().item() == 0.0  # exp(-8.75e4) underflows: the floor held


def test_tensors_on_different_devices_are_refused_before_any_call(cpu_library):
    q = torch.zeros(1, 1, 64, 32)
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta"):
        cpu_library.attention(q, q, q, torch.ones(1, 64, device="meta"), num_blocks=4)


def test_nan_inputs_still_give_a_well_formed_selection(cpu_library):
    """Non-finite inputs have no defined MRA result, but the reference must stay well defined:
    its top-k ranks scores by integer keys (NaN included) rather than a float comparison that
    NaN breaks, so each row still selects k distinct cells, ascending, and finite heads are
    untouched."""
    q, k, v = random_qkv(2, 3, 256, 32, seed=7)
    q[0, 1, ::3] = float("nan")  # one (batch, head) with NaN in many query rows
    mask = torch.ones(2, 256)
    output, selected = cpu_library.attention(q, k, v, mask, num_blocks=12)
    cells = 8 * 8
    for row in selected:
        assert row.unique().numel() == 12 and torch.all(row[1:] > row[:-1])
        assert 0 <= row.min() and row.max() < cells
    finite = [(b, h) for b in range(2) for h in range(3) if (b, h) != (0, 1)]
    exact = mra_attention(q, k, v, mask, num_blocks=12)
    for b, h in finite:
        assert torch.allclose(output[b, h], exact[b, h], atol=TOLERANCE, rtol=0)
