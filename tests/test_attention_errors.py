"""Bad input fails early with a ValueError/TypeError whose message names the problem; each is
also an InputError (a UserError), which the CLI prints as one line."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from mra_export import mra_attention, patch_model
from mra_export.errors import InputError, UserError

Q = torch.zeros(2, 3, 40, 16)
MASK = torch.ones(2, 40)


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((Q[0], Q[0], Q[0], MASK), {}, ValueError, r"query must be \[batch, heads, seq, head_dim\]"),
    ((Q, Q[:, :2], Q, MASK), {}, ValueError, "same shape"),
    ((Q, Q, Q[..., :8], MASK), {}, ValueError, "same shape"),
    ((Q, Q, Q, MASK[:, :39]), {}, ValueError, r"attention_mask must be \[batch, seq\] = \[2, 40\]"),
    ((Q, Q, Q, MASK[None]), {}, ValueError, "attention_mask must be"),
    ((Q, Q, Q, MASK.tolist()), {}, TypeError, "attention_mask must be a torch.Tensor"),
    ((Q.numpy(), Q, Q, MASK), {}, TypeError, "query must be a torch.Tensor"),
    ((Q.long(), Q.long(), Q.long(), MASK), {}, TypeError, "floating-point"),
    ((Q, Q, Q, MASK), {"num_blocks": 0}, ValueError, "num_blocks must be >= 1"),
    ((Q, Q, Q, MASK), {"num_blocks": 2.5}, TypeError, "num_blocks must be an int"),
    ((Q, Q, Q, MASK), {"approx_mode": "dense"}, ValueError, "approx_mode must be one of"),
    ((Q, Q, Q, MASK), {"initial_prior_first_n_blocks": -1}, ValueError,
     "initial_prior_first_n_blocks must be >= 0"),
    ((Q, Q, Q, MASK), {"block_size": 0}, ValueError, "block_size must be >= 1"),
    ((Q[:, :, :0], Q[:, :, :0], Q[:, :, :0], MASK[:, :0]), {}, ValueError, "at least 1"),
    ((Q, Q.half(), Q, MASK), {}, InputError, r"same dtype, got torch.float32, torch.float16"),
])
def test_bad_arguments_are_named(args, kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        mra_attention(*args, **{"num_blocks": 4, **kwargs})
    assert isinstance(raised.value, UserError)  # the CLI's one line, where a command meets it


@pytest.mark.parametrize("empty", [Q[:0], Q[:, :0]])
def test_an_empty_batch_or_no_heads_gives_an_empty_result(empty):
    """As scaled_dot_product_attention does: a shape-preserving empty output, not a crash."""
    mask = MASK[: empty.shape[0]]
    for dtype in (torch.float32, torch.float16):
        out = mra_attention(empty.to(dtype), empty.to(dtype), empty.to(dtype), mask, num_blocks=4)
        assert out.shape == empty.shape and out.dtype == dtype


def test_patch_model_refuses_a_model_that_is_not_mra():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(TypeError, match="expects a transformers MRA model.*got BertModel"):
        patch_model(bert)
    with pytest.raises(InputError, match="got Linear"):
        patch_model(torch.nn.Linear(2, 2))
