"""The exported graph's per-query-block sums (two-level prefix sums) equal index_add, and never
read the padding that makes their input whole chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mra_export.attention import SEGMENT_CHUNK, _sorted_segment_sum


def whole_chunks(values: torch.Tensor) -> torch.Tensor:
    """``values`` padded to whole chunks with NaN, as the export pads (with products that must
    not be summed): a NaN that reached a sum would show."""
    pad = (0, 0) * (values.dim() - 1) + (0, (-values.shape[0]) % SEGMENT_CHUNK)
    return F.pad(values, pad, value=float("nan"))


@pytest.mark.parametrize("counts", [[0, 3, 1, 0, 20, 5], [16, 16, 0], [1] * 40, [33]])  # never all 0
def test_matches_float64_index_add(counts):
    counts = torch.tensor(counts)
    segment = torch.repeat_interleave(torch.arange(len(counts)), counts)
    values = torch.randn(int(counts.sum()), 4, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(len(counts), 4, 3, dtype=torch.float64).index_add(0, segment, values.double())
    got = _sorted_segment_sum(whole_chunks(values), counts)
    assert got.shape == expected.shape
    assert (got.double() - expected).abs().max() <= 1e-5


def test_partial_sums_stay_small_so_float32_is_exact_enough():
    # A float32 prefix over 100k blocks would carry errors of ~1e-2 here (see the docstring).
    counts = torch.full((5000,), 20)
    values = 10 + torch.rand(100_000, 8, generator=torch.Generator().manual_seed(1))
    segment = torch.repeat_interleave(torch.arange(5000), counts)
    expected = torch.zeros(5000, 8, dtype=torch.float64).index_add(0, segment, values.double())
    assert SEGMENT_CHUNK == 16
    assert (_sorted_segment_sum(whole_chunks(values), counts).double() - expected).abs().max() <= 2e-4 * 20 * 10.5 / 100
