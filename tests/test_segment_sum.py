"""The exported graph's per-query-block sums (two-level prefix sums) equal index_add."""

from __future__ import annotations

import pytest
import torch

from mra_export.attention import SEGMENT_CHUNK, _sorted_segment_sum


@pytest.mark.parametrize("counts", [[0, 3, 1, 0, 20, 5], [16, 16, 0], [1] * 40, [33]])  # never all 0
def test_matches_float64_index_add(counts):
    counts = torch.tensor(counts)
    segment = torch.repeat_interleave(torch.arange(len(counts)), counts)
    values = torch.randn(int(counts.sum()), 4, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(len(counts), 4, 3, dtype=torch.float64).index_add(0, segment, values.double())
    got = _sorted_segment_sum(values, counts)
    assert got.shape == expected.shape
    assert (got.double() - expected).abs().max() <= 1e-5


def test_partial_sums_stay_small_so_float32_is_exact_enough():
    # A float32 prefix over 100k blocks would carry errors of ~1e-2 here (see the docstring).
    counts = torch.full((5000,), 20)
    values = 10 + torch.rand(100_000, 8, generator=torch.Generator().manual_seed(1))
    segment = torch.repeat_interleave(torch.arange(5000), counts)
    expected = torch.zeros(5000, 8, dtype=torch.float64).index_add(0, segment, values.double())
    assert SEGMENT_CHUNK == 16
    assert (_sorted_segment_sum(values, counts).double() - expected).abs().max() <= 2e-4 * 20 * 10.5 / 100
