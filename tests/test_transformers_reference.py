"""The CPU reproduction of transformers' CUDA primitives follows the kernel sources."""

from __future__ import annotations

import pytest
import torch

from mra_export.transformers_reference import CpuMraKernels


def test_index_max_truncates_toward_zero_and_fills_empty_rows():
    # One batch row, 3 query blocks (A) x 2 key blocks (B); two selected cells, both in query
    # block 1 (flat 2 and 3); query block 0 and 2 stay empty.
    index_vals = torch.zeros(1, 32, 2)
    index_vals[0, 0] = torch.tensor([-1.2349, -1.5])  # trunc(-1234.9) = -1234 > -1500
    index_vals[0, 1] = torch.tensor([0.0019, 0.0011])  # trunc -> 1 and 1
    indices = torch.tensor([[2, 3]], dtype=torch.int32)
    max_vals, scatter = CpuMraKernels.index_max(index_vals, indices, 3, 2)
    assert max_vals.shape == (1, 96)
    # exactly: the kernel divides in double and stores a float32
    assert max_vals[0, 32] == torch.tensor(-1234 / 1000, dtype=torch.float32)
    assert max_vals[0, 33] == torch.tensor(1 / 1000, dtype=torch.float32)
    assert (max_vals[0, :32] == -1e5).all() and (max_vals[0, 64:] == -1e5).all()
    assert torch.equal(scatter[0, :, 0], max_vals[0, 32:64])


def test_mm_to_sparse_is_the_block_product_in_key_query_layout():
    generator = torch.Generator().manual_seed(0)
    dense_q = torch.randn(1, 3, 64, 32, generator=generator)  # [b, nb, dim, 32]
    dense_k = torch.randn(1, 3, 64, 32, generator=generator)
    indices = torch.tensor([[0, 5, 7, 4, 8]], dtype=torch.int32)  # 5 cells: grid covers 4
    sparse = CpuMraKernels.mm_to_sparse(dense_q, dense_k, indices)
    for s, cell in enumerate(indices[0].tolist()[:4]):
        q_block, k_block = divmod(cell, 3)
        expected = dense_k[0, k_block].double().T @ dense_q[0, q_block].double()  # [k, q]
        assert (sparse[0, s].double() - expected).abs().max() <= 1e-5
    assert (sparse[0, 4] == 0).all()  # the kernel grid (n / 4 blocks of 4) skips the fifth


def test_sparse_dense_mm_accumulates_into_query_blocks():
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(1, 3, 32, 32, generator=generator)  # [b, n, k, q]
    values = torch.randn(1, 2, 64, 32, generator=generator)  # [b, nb, dim, 32(k)]
    indices = torch.tensor([[1, 0, 3]], dtype=torch.int32)  # cells (0,1), (0,0), (1,1)
    out = CpuMraKernels.sparse_dense_mm(weights, indices, values, 2)
    expected0 = sum(values[0, k].double() @ weights[0, s].double() for s, k in ((0, 1), (1, 0)))
    assert (out[0, 0].double() - expected0).abs().max() <= 1e-5
    assert (out[0, 1] == 0).all()  # the third cell is outside the grid of n / 2 blocks of 2


@pytest.mark.parametrize("dim", [32, 96])
def test_head_dims_the_cuda_kernel_overruns_are_refused(dim):
    with pytest.raises(ValueError, match="not a multiple of 64"):
        CpuMraKernels.sparse_dense_mm(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, dtype=torch.int32),
                                      torch.zeros(1, 2, dim, 32), 2)
