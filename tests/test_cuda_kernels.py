"""The CUDA kernels against the PyTorch reference on a GPU (skipped where there is none).

tools/gpu_check.py runs the larger comparison and the benchmarks; these are its quick subset.
"""

from __future__ import annotations

import pytest
import torch

from mra_export import native
from mra_export.kernel_check import compare_with_reference

from .conftest import random_qkv, ragged_mask

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_library():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (these tests run on a machine with one; see tools/gpu_check.py)")
    places = [native.build_dir(), native.GPU_CHECK_BUILD_DIR]  # make plugins', gpu_check's
    built = [place / native.CUDA_LIBRARY for place in places if (place / native.CUDA_LIBRARY).is_file()]
    if not built:
        pytest.skip(f"the CUDA kernels are not built in {' or '.join(map(str, places))} (make "
                    "plugins, or python tools/gpu_check.py; both need nvcc)")
    return native.MraLibrary(built[0])


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("seq_len", [31, 256, 1000])
def test_fp32_matches_pytorch_and_selects_the_same_blocks(cuda_library, head_dim, mode, seq_len):
    q, k, v = (t.cuda() for t in random_qkv(3, 4, seq_len, head_dim, seed=seq_len))
    mask = ragged_mask(3, seq_len, [seq_len, seq_len // 2, 0]).cuda()
    kw = dict(num_blocks=8 * ((seq_len + 31) // 32), approx_mode=mode,
              initial_prior_first_n_blocks=1, initial_prior_diagonal_n_blocks=3)
    ours, selected = cuda_library.attention(q, k, v, mask, **kw)
    result = compare_with_reference(ours, selected, q, k, v, mask, tolerance=1e-5, **kw)
    assert result.passed, result.summary()


def test_every_batch_selects_alike_whatever_cluster_splits_its_rows(cuda_library):
    """With 12 heads a row's selection runs on a cluster of 8, 4, 2 and 1 CTAs at batch 1, 2, 4
    and 8 on a GPU of 132 SMs that runs that many clusters at once (sm_90 builds; one CTA per row
    elsewhere): PyTorch's blocks at each batch, and the first sample's blocks the same bits at
    every batch. Its output stays within 1e-6 of batch 1's: at the small batches the
    high-resolution kernel splits each query block's key blocks over 2 thread groups, which sums
    them in another order."""
    q, k, v = (t.cuda() for t in random_qkv(8, 12, 2048, 64, seed=25))
    mask = ragged_mask(8, 2048, [2048, 1500, 2048, 900, 2048, 2048, 1, 2048]).cuda()
    kw = dict(num_blocks=8 * 64, approx_mode="full", initial_prior_first_n_blocks=1,
              initial_prior_diagonal_n_blocks=3)
    first = None
    for batch in (1, 2, 4, 8):
        inputs = (q[:batch], k[:batch], v[:batch], mask[:batch])
        ours, selected = cuda_library.attention(*inputs, **kw)
        result = compare_with_reference(ours, selected, *inputs, tolerance=1e-5, **kw)
        assert result.passed, f"batch {batch}: {result.summary()}"
        first = first or (ours[0], selected[:12])
        assert torch.equal(selected[:12], first[1]), batch
        assert (ours[0] - first[0]).abs().max().item() <= 1e-6, batch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_the_relative_target(cuda_library, dtype):
    q, k, v = (t.cuda().to(dtype) for t in random_qkv(2, 12, 512, 64, seed=1))
    mask = ragged_mask(2, 512, [512, 300]).cuda()
    ours, selected = cuda_library.attention(q, k, v, mask, num_blocks=128)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-2
    result = compare_with_reference(ours, selected, q, k, v, mask, tolerance=tolerance,
                                    relative=True, num_blocks=128)
    assert result.passed, result.summary()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_real_keys_far_below_a_padded_key_maximum_do_not_underflow(cuda_library, dtype):
    """Padded keys have logit 0 and count in M, so with real logits at -20 every weight is
    exp(-20) = 2e-9, below fp16's least subnormal (6e-8): zero. The kernels take the
    exponentials against the real keys' maximum instead (weights 1)."""
    _, _, v = random_qkv(1, 2, 64, 64, seed=21)
    q, k = torch.zeros_like(v), torch.zeros_like(v)
    q[..., 0], k[..., 0] = 1.0, -160.0  # real logits 1 * -160 / sqrt(64) = -20
    mask = ragged_mask(1, 64, [40])  # key block 1 is a quarter padding: M = 0 there
    q, k, v = (t.to(dtype).cuda() for t in (q, k, v))
    mask = mask.cuda()
    ours, selected = cuda_library.attention(q, k, v, mask, num_blocks=4, approx_mode="sparse")
    result = compare_with_reference(ours, selected, q, k, v, mask, tolerance=2e-3, relative=True,
                                    num_blocks=4, approx_mode="sparse")
    assert result.passed, result.summary()
    # The reference's own result is about 0.037 here, not V's average: its normaliser's 1e-6
    # outweighs the rows' 32 weights of exp(-20). Weights that vanished would give zeros.
    assert ours[0, :, :40].float().abs().amax().item() > 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_major_layout_is_the_same_attention(cuda_library, dtype):
    """Layout MRA_BSHD (the patched model's projections, uncopied): the [B, H, S, D] result bit
    for bit, and the selection (tests/test_cpu_reference.py has the same check for the twin and
    the emulated kernels)."""
    q, k, v = (t.cuda().to(dtype) for t in random_qkv(2, 12, 1000, 64, seed=31))
    mask = ragged_mask(2, 1000, [1000, 421]).cuda()
    token_major, token_major_selected = cuda_library.attention(q, k, v, mask, layout="bshd",
                                                               num_blocks=256)
    head_major, head_major_selected = cuda_library.attention(q, k, v, mask, num_blocks=256)
    assert token_major.transpose(1, 2).is_contiguous()
    assert torch.equal(token_major, head_major)
    assert torch.equal(token_major_selected, head_major_selected)
