"""With every block selected, MRA is exact: masked softmax attention computed in float64."""

from __future__ import annotations

import math

import pytest
import torch

from mra_export import mra_attention

from .conftest import random_qkv, ragged_mask


def normaliser_error_bound(q, k, v, mask):
    """How far MRA may sit from softmax: it divides by ``sum(w) + 1e-6`` (MRA_SPEC 7), with
    ``w = exp(P - M)`` and M the 1e-3-quantised max over whole 32-key blocks, masked keys
    included (their logit is 0 before the -1e4 penalty). So ``sum(w) >= exp(min(max P, 0) - 1e-3)``
    over a query's real keys, and the relative error is at most ``1e-6 / sum(w)``."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    real_max = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf")).amax(-1)
    smallest_sum = torch.exp(torch.clamp(real_max, max=0.0) - 1e-3)
    relative = 1e-6 / smallest_sum.nan_to_num(1.0, posinf=1.0, neginf=1.0)
    return 2e-6 + relative[..., None] * v.abs().amax()


def dense_attention_float64(q, k, v, mask):
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-padding rows: no keys at all
    return (weights @ v) * mask[:, None, :, None]


@pytest.mark.parametrize("mode", ["full", "sparse"])
@pytest.mark.parametrize("seq_len,head_dim", [(1, 64), (31, 16), (64, 64), (100, 40),
                                              (257, 32), (300, 128)])
def test_every_block_selected_equals_dense_softmax(mode, seq_len, head_dim):
    n_blocks = math.ceil(seq_len / 32)
    q, k, v = random_qkv(3, 2, seq_len, head_dim, seed=seq_len)
    mask = ragged_mask(3, seq_len, [seq_len, max(1, seq_len // 2), 0])
    ours = mra_attention(q, k, v, mask, num_blocks=n_blocks * n_blocks, approx_mode=mode)
    expected = dense_attention_float64(q, k, v, mask)
    assert ours.dtype == torch.float32
    assert ((ours.double() - expected).abs() <= normaliser_error_bound(q, k, v, mask)).all()


def test_num_blocks_beyond_the_block_count_is_clamped():
    q, k, v = random_qkv(1, 2, 96, 32, seed=1)
    mask = torch.ones(1, 96)
    clamped = mra_attention(q, k, v, mask, num_blocks=10**6)
    assert torch.equal(clamped, mra_attention(q, k, v, mask, num_blocks=9))
    error = (clamped.double() - dense_attention_float64(q, k, v, mask)).abs()
    assert (error <= normaliser_error_bound(q, k, v, mask)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype(dtype):
    q, k, v = (t.to(dtype) for t in random_qkv(1, 2, 64, 32, seed=2))
    mask = torch.ones(1, 64)
    ours = mra_attention(q, k, v, mask, num_blocks=4)
    assert ours.dtype == dtype
    expected = dense_attention_float64(q.float(), k.float(), v.float(), mask)
    assert (ours.double() - expected).abs().max().item() <= 1e-2  # the output rounding only


def test_gradients_match_dense_softmax_when_every_block_is_selected():
    """mra_attention stays differentiable (patched models can be fine-tuned): with every block
    selected its gradients are softmax attention's, the quantised maximum being a constant."""
    q, k, v = random_qkv(2, 2, 80, 32, seed=8)
    mask = ragged_mask(2, 80, [80, 50])
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    mra_attention(*ours, mask, num_blocks=9).square().sum().backward()
    dense = [t.double().requires_grad_() for t in (q, k, v)]
    dense_attention_float64(*dense, mask).square().sum().backward()
    for mine, exact in zip(ours, dense):
        assert (mine.grad.double() - exact.grad).abs().max().item() <= 1e-4
