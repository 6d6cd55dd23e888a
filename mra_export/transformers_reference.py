"""transformers' own MRA, made to run on the CPU: the independent reference for parity checks.

transformers' ``mra2_attention`` needs a CUDA extension for three primitives and silently returns
zeros without it. ``CpuMraKernels`` reproduces those primitives on the CPU, written from the CUDA
sources of transformers v4 (``src/transformers/kernels/mra/cuda_kernel.cu``, ``cuda_launch.cu``):
the same layouts, the same integer quantisation in ``index_max``, and the same launch geometry
(``mm_to_sparse`` computes ``(n // 4) * 4`` blocks, ``sparse_dense_mm`` ``(n // 2) * 2``; the
rest stay zero). Where the kernel would read or write past a block (head dims that are not a
multiple of 64 in ``sparse_dense_mm``, of 16 in ``mm_to_sparse``), it raises instead of guessing:
transformers itself is wrong there.

It shares no code with ``mra_export.attention``; everything above the primitives is transformers.

Whole transformers models are a reference only where their padding mask is right: before 5.19,
``MraSelfAttention`` undoes the additive mask with ``1 + mask / 10000`` (written for a -10000
mask) while the model passes ``finfo.min``, so padded tokens are multiplied by -2**31.
``transformers_model_outputs`` refuses padded inputs there (``padding_unsupported_reason``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import transformers
from packaging.version import Version

from .errors import UserError

BLOCK = 32
INT32_MAX = 2**31 - 1
KERNEL_EMPTY_MAX = -100_000_000  # ``max_buffer[idx] = -1e8`` stored as int
PADDING_FIXED_IN = Version("5.19.0")  # the first transformers whose MRA undoes its mask correctly


class CpuMraKernels:
    """Drop-in for transformers' ``mra_cuda_kernel`` (the hub kernel ``kernels-community/mra``)."""

    @staticmethod
    def index_max(index_vals, indices, a_num_block: int, b_num_block: int):
        """``index_vals [b, 32, n]`` (per-query max of each selected block) -> row maxima.

        Returns ``max_vals [b, a_num_block * 32]`` and ``max_vals_scatter [b, 32, n]``.
        """
        batch, rows, n = index_vals.shape
        query_block = indices.long() // b_num_block  # [b, n]
        product = index_vals.float() * 1000  # fp32 product, as in the kernel
        if product.abs().max() > INT32_MAX:
            raise ValueError("index_max: a logit times 1000 overflows int32 (undefined in CUDA)")
        quantised = torch.trunc(product).to(torch.int64)  # (int) conversion truncates
        slot = query_block[:, None, :] * BLOCK + torch.arange(rows)[None, :, None]  # [b, 32, n]
        buffer = torch.full((batch, a_num_block * BLOCK), KERNEL_EMPTY_MAX, dtype=torch.int64)
        buffer = buffer.scatter_reduce(1, slot.reshape(batch, -1), quantised.reshape(batch, -1),
                                       reduce="amax", include_self=True)
        # ``(float)max_buffer[idx] / 1000.`` divides in double, then stores a float.
        max_vals = (buffer.to(torch.float32).to(torch.float64) / 1000.0).to(torch.float32)
        scatter = torch.gather(max_vals, 1, slot.reshape(batch, -1)).reshape(batch, rows, n)
        return max_vals, scatter

    @staticmethod
    def mm_to_sparse(dense_a, dense_b, indices):
        """``C[s][k][q] = sum_d A[qblock(s)][d][q] * B[kblock(s)][d][k]`` for each selected s."""
        batch, _, dim, _ = dense_a.shape
        b_num_block = dense_b.shape[1]
        if dim % 16 != 0:
            raise ValueError(f"mm_to_sparse: head dim {dim} is not a multiple of 16; the CUDA "
                             "kernel reads an unloaded buffer half there")
        n = indices.shape[1]
        computed = (n // 4) * 4  # grid of n / 4 blocks x 4 warps
        a = _take_blocks(dense_a, indices.long()[:, :computed] // b_num_block)
        b = _take_blocks(dense_b, indices.long()[:, :computed] % b_num_block)
        sparse = torch.zeros(batch, n, BLOCK, BLOCK, dtype=torch.float32)
        sparse[:, :computed] = torch.einsum("bndk,bndq->bnkq", b, a)
        return sparse

    @staticmethod
    def sparse_dense_mm(sparse_a, indices, dense_b, a_num_block: int):
        """``C[qblock(s)][d][q] += sum_k A[s][k][q] * B[kblock(s)][d][k]`` (atomicAdd)."""
        batch, n = indices.shape
        b_num_block, dim = dense_b.shape[1], dense_b.shape[2]
        if dim % 64 != 0:
            raise ValueError(f"sparse_dense_mm: head dim {dim} is not a multiple of 64; the CUDA "
                             "kernel reads and writes 64 dims per block and overruns it")
        processed = (n // 2) * 2  # grid of n / 2 blocks x 2 warps
        index = indices.long()[:, :processed]
        values = _take_blocks(dense_b, index % b_num_block)  # [b, m, dim, 32(k)]
        contribution = torch.einsum("bnkq,bndk->bndq", sparse_a[:, :processed].float(), values)
        dense_c = torch.zeros(batch, a_num_block, dim, BLOCK, dtype=torch.float32)
        target = index // b_num_block
        for row in range(batch):  # test-only reference: clarity over speed
            dense_c[row].index_add_(0, target[row], contribution[row])
        return dense_c


def _take_blocks(dense, block_index):
    """``dense [b, nb, dim, 32]`` at ``block_index [b, n]`` -> ``[b, n, dim, 32]``."""
    row = torch.arange(dense.shape[0])[:, None]
    return dense[row, block_index].float()


def _lower_index_topk(input, k, dim=-1, largest=True, sorted=True):
    """``torch.topk`` whose ties go to the lower index (the spec's rule, and ONNX TopK's)."""
    order = torch.sort(input, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((order.values.narrow(dim, 0, k), order.indices.narrow(dim, 0, k)))


class _TorchWithLowerIndexTopk(types.ModuleType):
    """``torch`` as ``modeling_mra`` sees it, with ``topk`` following the spec's tie rule."""

    def __init__(self):
        super().__init__("torch")
        self.topk = _lower_index_topk

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def cpu_kernels(spec_ties: bool = False) -> Iterator[None]:
    """Install ``CpuMraKernels`` as transformers' MRA kernel module for the duration.

    transformers' block selection uses ``torch.topk``, which gives no rule for ties. With
    ``spec_ties`` its ``topk`` breaks ties by the lower flat index, as MRA_SPEC requires; the rest
    of transformers' code is unchanged.
    """
    from transformers.models.mra import modeling_mra

    previous = modeling_mra.mra_cuda_kernel, modeling_mra.torch
    modeling_mra.mra_cuda_kernel = CpuMraKernels()
    if spec_ties:
        modeling_mra.torch = _TorchWithLowerIndexTopk()
    try:
        yield
    finally:
        modeling_mra.mra_cuda_kernel, modeling_mra.torch = previous


def transformers_mra2_attention(query, key, value, attention_mask, *, num_blocks,
                                approx_mode="full", initial_prior_first_n_blocks=0,
                                initial_prior_diagonal_n_blocks=0, spec_ties=False):
    """transformers' ``mra2_attention`` on ``[B, H, S, D]``, each sample with its own mask.

    transformers needs ``S % 32 == 0`` and ``num_blocks <= (S / 32) ** 2``; this wrapper does not
    hide that. The mask is expanded per (batch, head) correctly, unlike ``MraSelfAttention``.
    """
    from transformers.models.mra import modeling_mra

    batch, heads, seq_len, _ = query.shape
    mask = attention_mask.float()[:, None, :].expand(batch, heads, seq_len)
    with cpu_kernels(spec_ties):
        return modeling_mra.mra2_attention(
            query.float(), key.float(), value.float(), mask.reshape(batch * heads, seq_len),
            num_blocks, approx_mode=approx_mode,
            initial_prior_first_n_blocks=initial_prior_first_n_blocks,
            initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
        )


def padding_unsupported_reason(version: str | None = None) -> str | None:
    """Why the installed transformers' own MRA models are wrong on padded inputs, or ``None``."""
    version = version or transformers.__version__
    if Version(version) >= PADDING_FIXED_IN:
        return None
    return (f"transformers {version}'s MRA multiplies padded tokens by -2**31 (MraSelfAttention "
            "undoes the model's finfo.min padding mask with 1 + mask / 10000), so it cannot be "
            f"the reference for padded inputs; pip install -U 'transformers>={PADDING_FIXED_IN}'")


def require_padding_support(attention_mask: torch.Tensor | None) -> None:
    """Refuse, in one line, padded inputs that the installed transformers gets wrong."""
    reason = padding_unsupported_reason()
    if reason and attention_mask is not None and bool((attention_mask == 0).any()):
        raise UserError(reason)


def transformers_model_outputs(model, task, inputs: dict, spec_ties: bool = True) -> dict:
    """An unpatched transformers MRA head run where transformers is correct: one sequence at a
    time (for multiple-choice one choice at a time too, since it folds choices into the batch),
    its outputs concatenated back. ``inputs`` are torch tensors; lengths must be multiples of 32
    with enough blocks for the config's num_blocks. Padded inputs need transformers >= 5.19."""
    require_padding_support(inputs.get("attention_mask"))
    batch = inputs["input_ids"].shape[0]
    choices = inputs["input_ids"].shape[1] if task.has_choices else None

    def run(index):
        with torch.no_grad():
            return model(**{name: tensor[index] for name, tensor in inputs.items()})

    with cpu_kernels(spec_ties):
        if choices is None:
            runs = [run(slice(b, b + 1)) for b in range(batch)]
            return {name: torch.cat([r[name] for r in runs]) for name in task.outputs}
        logits = [torch.cat([run((slice(b, b + 1), slice(c, c + 1))).logits
                             for c in range(choices)], dim=1) for b in range(batch)]
        return {"logits": torch.cat(logits)}
