"""Properties of mra_attention over random shapes, masks, modes, priors and num_blocks."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mra_export import mra_attention

BLOCK = 32


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 200))
    head_dim = draw(st.sampled_from([4, 16, 32, 64]))
    lengths = draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch))
    kwargs = dict(
        num_blocks=draw(st.integers(1, 80)),
        approx_mode=draw(st.sampled_from(["full", "sparse"])),
        initial_prior_first_n_blocks=draw(st.integers(0, 3)),
        initial_prior_diagonal_n_blocks=draw(st.integers(0, 5)),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(batch, heads, seq_len, head_dim, generator=generator)
               for _ in range(3))
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).float()
    return q, k, v, mask, kwargs


def extend(tensors, mask, extra, generator):
    """Append ``extra`` masked positions holding random values (they must not matter)."""
    q, k, v = (torch.cat([t, torch.randn(*t.shape[:2], extra, t.shape[3], generator=generator)], 2)
               for t in tensors)
    return q, k, v, torch.cat([mask, torch.zeros(mask.shape[0], extra)], 1)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_finite_and_zero_at_masked_queries(case):
    q, k, v, mask, kwargs = case
    out = mra_attention(q, k, v, mask, **kwargs)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()
    assert (out * (1 - mask)[:, None, :, None]).abs().max() == 0


@settings(max_examples=60, deadline=None)
@given(cases())
def test_batched_equals_each_sample_alone(case):
    q, k, v, mask, kwargs = case
    batched = mra_attention(q, k, v, mask, **kwargs)
    for b in range(q.shape[0]):
        alone = mra_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1], **kwargs)
        assert (batched[b:b + 1] - alone).abs().max() <= 1e-5


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, BLOCK - 1))
def test_masked_tokens_inside_the_last_block_change_nothing(case, extra):
    q, k, v, mask, kwargs = case
    seq_len = q.shape[2]
    extra = min(extra, math.ceil(seq_len / BLOCK) * BLOCK - seq_len)  # stay in the same block
    generator = torch.Generator().manual_seed(extra)
    longer = mra_attention(*extend((q, k, v), mask, extra, generator), **kwargs)
    assert (longer[:, :, :seq_len] - mra_attention(q, k, v, mask, **kwargs)).abs().max() <= 1e-5


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, 3 * BLOCK))
def test_masked_blocks_after_a_masked_block_change_nothing(case, extra):
    """Padding at the end is invariant once each sample already ends in a fully masked block.

    The first fully masked key block is not free: L = 0 there, and the row maximum r is taken
    before masking (MRA_SPEC step 2, as transformers does), which can change the cross-row top-k.
    ``test_the_first_masked_block_moves_the_row_maximum`` shows that case against transformers.
    """
    q, k, v, mask, kwargs = case
    generator = torch.Generator().manual_seed(extra)
    to_block = (-q.shape[2]) % BLOCK + BLOCK  # finish the last block, then one masked block
    q, k, v, mask = extend((q, k, v), mask, to_block, generator)
    base = mra_attention(q, k, v, mask, **kwargs)
    longer = mra_attention(*extend((q, k, v), mask, extra, generator), **kwargs)
    assert (longer[:, :, :q.shape[2]] - base).abs().max() <= 1e-5
