"""The exported graph's per-query-block sums (two-level prefix sums, along each row) equal
index_add, and never read the padding that makes each row's blocks whole chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mra_export.attention import SEGMENT_CHUNK, _sorted_segment_sum


def whole_chunks(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Each row's blocks of ``values`` padded to whole chunks with NaN, as the export pads (with
    products that must not be summed): a NaN that reached a sum would show."""
    per_row = values.reshape(rows, -1, *values.shape[1:])
    pad = (0, 0) * (values.dim() - 1) + (0, (-per_row.shape[1]) % SEGMENT_CHUNK)
    return F.pad(per_row, pad, value=float("nan")).reshape(-1, *values.shape[1:])


def float64_index_add(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    segment = torch.repeat_interleave(torch.arange(counts.numel()), counts.reshape(-1))
    return torch.zeros(counts.numel(), *values.shape[1:], dtype=torch.float64).index_add(
        0, segment, values.double())


@pytest.mark.parametrize("counts", [
    [[0, 3, 1, 0, 20, 5]],
    [[16, 16, 0], [0, 0, 32], [5, 27, 0]],  # rows of whole chunks, empty segments at either end
    [[1] * 40, [40] + [0] * 39],
    [[33], [33]],
])
def test_matches_float64_index_add(counts):
    counts = torch.tensor(counts)
    values = torch.randn(int(counts.sum()), 4, 3, generator=torch.Generator().manual_seed(0))
    expected = float64_index_add(values, counts)
    got = _sorted_segment_sum(whole_chunks(values, counts.shape[0]), counts)
    assert got.shape == expected.shape
    assert (got.double() - expected).abs().max() <= 1e-5


def test_partial_sums_stay_small_so_float32_is_exact_enough():
    # A float32 prefix over 100k blocks would carry errors of ~1e-2 here (see the docstring).
    counts = torch.full((50, 100), 20)
    values = 10 + torch.rand(100_000, 8, generator=torch.Generator().manual_seed(1))
    expected = float64_index_add(values, counts)
    assert SEGMENT_CHUNK == 16
    got = _sorted_segment_sum(whole_chunks(values, 50), counts)
    assert (got.double() - expected).abs().max() <= 2e-4 * 20 * 10.5 / 100
