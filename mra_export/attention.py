"""MRA-2 attention, exactly as transformers' ``mra2_attention`` computes it, in portable PyTorch.

The numbered steps follow ``MRA_SPEC.md``. Everything is vectorised over the meta-batch
``(batch, head)`` rows and over blocks: no Python loop over blocks, heads or samples, and no
``S x S`` or ``nb x nb x T x T`` tensor. The same code runs eagerly on CPU and CUDA and is what
``torch.onnx.export`` traces for the portable ONNX flavour, so it avoids data-dependent shapes.

Where transformers differs (and is wrong), this implementation:
- gives every sample its own mask (transformers mixes them up inside a batch);
- accepts any length (pads to a block multiple internally, masked, then slices back);
- clamps ``num_blocks`` to the number of blocks ``nb * nb`` (then every block is exact).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import InputError, InputTypeError

APPROX_MODES = ("full", "sparse")

# Constants of the reference implementation (transformers / the CUDA kernels).
MASKED_LOGIT_PENALTY = 1e4  # subtracted from logits of masked blocks and keys
PRIOR_BONUS = 5e3  # added to the low-resolution scores of prior blocks
ROW_MAX_SCALE = 1000.0  # the kernel quantises row maxima to 1e-3 steps ...
EMPTY_ROW_MAX = -1e8  # ... starting from this integer, so an empty row gets M = -1e5
NORMALISER_EPS = 1e-6  # added to token counts and to the softmax normaliser


def mra_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    num_blocks: int,
    approx_mode: str = "full",
    block_size: int = 32,
    initial_prior_first_n_blocks: int = 0,
    initial_prior_diagonal_n_blocks: int = 0,
) -> torch.Tensor:
    """MRA attention of ``[batch, heads, seq, head_dim]`` tensors under a ``[batch, seq]`` mask.

    ``attention_mask`` is 1 (or any non-zero) for real tokens and 0 for padding; ``None`` means
    every token is real. (An additive mask, 0 for tokens and negative for padding, would read
    inverted: pass ``mask == 0`` instead. Its values are not checked, to keep this free of
    device synchronisation.) ``num_blocks`` is the number of ``block_size x block_size`` blocks kept
    at high resolution per ``(batch, head)``; it is clamped to the number of blocks. Computed in
    float32, returned in the dtype of ``query``. Masked query positions are zero.
    """
    _check_arguments(query, key, value, attention_mask, num_blocks, approx_mode, block_size,
                     initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks)
    batch, heads, seq_len, head_dim = query.shape
    if batch == 0 or heads == 0:  # nothing to attend to (as SDPA, an empty result)
        return torch.zeros_like(query)
    if attention_mask is None:
        attention_mask = torch.ones(batch, seq_len, device=query.device)

    blocks = _Blocks.of(query, key, value, attention_mask, block_size)
    rows, n_blocks = blocks.rows, blocks.n_blocks

    # 1-2. Low resolution: block means and their logits.
    low_logits, row_max, count, value_hat = _low_resolution(blocks, head_dim)
    # 3. Selection of the high-resolution blocks.
    scores, flat_index, threshold, chosen = _selection(
        low_logits, row_max, num_blocks, initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks)
    blocks_per_query_block = chosen.sum(dim=-1)  # [rows, nb]
    # 4-6. High resolution on the selected blocks.
    hi_out, hi_norm, quantised_max = _high_resolution(blocks, flat_index,
                                                      blocks_per_query_block, head_dim)

    if approx_mode == "full":
        # 7. Low-resolution attention on the blocks not computed exactly, and the correction.
        exact = (scores >= threshold[:, :, None]).float()
        context = _combine_full(blocks, hi_out, hi_norm, quantised_max, low_logits, row_max,
                                exact, count, value_hat)
    else:
        context = (hi_out / (hi_norm[..., None] + NORMALISER_EPS)).reshape(rows, -1, head_dim)

    # 8. Masked queries give zero.
    context = context * blocks.query_mask[..., None]
    context = context.reshape(batch, heads, n_blocks * block_size, head_dim)[:, :, :seq_len]
    return context.to(query.dtype)


class BlockSelection(NamedTuple):
    """What ``mra_attention`` decides before its high-resolution step, per (batch, head) row."""

    indices: torch.Tensor  # [rows, k] selected flat cells query_block * nb + key_block, ascending
    scores: torch.Tensor  # [rows, nb * nb] the selection scores (with priors)
    threshold: torch.Tensor  # [rows, 1] the k-th largest score
    chosen: torch.Tensor  # [rows, nb * nb] bool: the selected cells
    logit_max: torch.Tensor  # [rows, nb * T] each query's largest selected logit, unquantised


def selected_blocks(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    *, num_blocks: int, block_size: int = 32, initial_prior_first_n_blocks: int = 0,
                    initial_prior_diagonal_n_blocks: int = 0) -> torch.Tensor:
    """The cells ``mra_attention`` computes at high resolution: ``[batch * heads, k]`` flat
    indices ``query_block * nb + key_block`` per (batch, head), ascending."""
    _, (_, indices, _, _) = _select(query, key, attention_mask, num_blocks, block_size,
                                    initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks)
    return indices


def block_selection(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    *, num_blocks: int, block_size: int = 32, initial_prior_first_n_blocks: int = 0,
                    initial_prior_diagonal_n_blocks: int = 0) -> BlockSelection:
    """The selection with what another implementation needs to judge its differences: scores
    and threshold (a cell within an ulp of the threshold may go either way), and each query's
    largest selected logit (one within an ulp of a 1e-3 step may truncate either way)."""
    blocks, (scores, indices, threshold, chosen) = _select(
        query, key, attention_mask, num_blocks, block_size, initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks)
    query_block, key_block = blocks.global_block(indices)
    block_max = _selected_logits(blocks, query_block, key_block, query.shape[-1]).amax(dim=-1)
    logit_max = _max_per_query_block(blocks, block_max, query_block, -math.inf)
    return BlockSelection(indices, scores.reshape(blocks.rows, -1), threshold,
                          chosen.reshape(blocks.rows, -1), logit_max.reshape(blocks.rows, -1))


def _select(query, key, attention_mask, num_blocks, block_size, first_n, diagonal_n):
    """Steps 1-3 for ``selected_blocks`` and ``block_selection``."""
    _check_arguments(query, key, key, attention_mask, num_blocks, "full", block_size, first_n,
                     diagonal_n)
    if attention_mask is None:
        attention_mask = torch.ones(query.shape[0], query.shape[2], device=query.device)
    blocks = _Blocks.of(query, key, key, attention_mask, block_size)
    low_logits, row_max, _, _ = _low_resolution(blocks, query.shape[-1])
    return blocks, _selection(low_logits, row_max, num_blocks, first_n, diagonal_n)


def _selection(low_logits, row_max, num_blocks: int, first_n: int, diagonal_n: int):
    """Step 3: the scores with priors, and the selected cells of each meta-batch row."""
    n_blocks = low_logits.shape[-1]
    scores = _with_priors(low_logits - row_max, first_n, diagonal_n)
    top_k = torch.sym_min(num_blocks, n_blocks * n_blocks)
    flat_index, threshold, chosen = select_top_blocks(scores, top_k)
    return scores, flat_index, threshold, chosen


def select_top_blocks(scores: torch.Tensor, k):
    """Flat indices of the ``k`` largest scores of each row's ``[nb, nb]`` grid of cells
    (``scores`` is ``[rows, nb, nb]``), ties going to the lower flat index
    ``query_block * nb + key_block``.

    Returns ``(indices [rows, k], threshold [rows, 1], chosen [rows, nb, nb])``: the threshold
    is the k-th largest score and ``chosen`` marks the selected cells. The indices come out in
    ascending flat order, so the blocks of a query row are adjacent.
    ``torch.topk`` gives no tie guarantee, so it is only used for the threshold (whose value does
    not depend on ties); the ties at the threshold are taken in flat order with a running count,
    and a second, tie-free top-k over ``n - flat_index`` lists the chosen cells.
    """
    rows = scores.shape[0]
    flat = scores.reshape(rows, -1)
    top_values = torch.topk(flat, k, dim=-1).values
    threshold = top_values[:, -1, None]  # [:, -1:] would export as max(0, k - max(0, k - 1)) wide
    cut = threshold[:, :, None]  # against the grid
    at = scores == cut
    # The ties to take, k - above.sum(), counted among the top-k values (which hold every score
    # above the threshold) because k is a shape value: onnxruntime's CUDA provider computes it
    # on the CPU, and as an operand of device arithmetic it would cost a copy. `~(>)`, not `<=`,
    # counts a NaN among them as k - above.sum() does.
    still_needed = (~(top_values > threshold)).sum(dim=-1, keepdim=True)[:, :, None]
    chosen = (scores > cut) | (at & (_running_count(at) <= still_needed))
    # int32: onnxruntime's CUDA TopK takes one radix pass per byte of its input. (Cast after an
    # int64 arange: an int32 one is exported through a float Range and six more nodes.)
    lower_first = torch.arange(flat.shape[-1], 0, -1, device=scores.device).to(torch.int32)
    indices = torch.topk(torch.where(chosen.reshape(rows, -1), lower_first, 0), k, dim=-1).indices
    return indices, threshold, chosen


def _running_count(flags: torch.Tensor) -> torch.Tensor:
    """``cumsum`` of a ``[rows, nb, nb]`` grid of flags in row-major (flat cell) order, as two
    scans of ``nb``: first along each query block's cells, then of the query blocks' totals.

    Exactly the same integers as one scan of the flattened grid. onnxruntime's CUDA CumSum has
    every output element add up its whole prefix (``cumsum_impl.cu``), so a scan of ``n`` costs
    ``n² / 2`` reads: one over the 16384 cells of 4096 tokens came to 1.6e9 reads for the 12 rows
    of a batch of 1.
    """
    within = torch.cumsum(flags.to(torch.int64), dim=-1)
    totals = within[:, :, -1]
    before = torch.cumsum(totals, dim=-1) - totals
    return within + before[:, :, None]


class _Blocks:
    """Masked Q, K, V of the meta-batch rows, viewed as blocks, and the row/block bookkeeping."""

    @classmethod
    def of(cls, query, key, value, attention_mask, block_size: int) -> _Blocks:
        """``[B, H, S, D]`` inputs, masked (step 1) and padded with masked positions to a block
        multiple."""
        # The padding from the block count, not as (-S) % T: an export's symbolic shapes split a
        # length of nb * T into [nb, T] but not S + (-S) % T, whose every later shape then
        # carried unsimplifiable quotients (a third more export time for the tests' model).
        n_blocks = (query.shape[2] + block_size - 1) // block_size
        pad = n_blocks * block_size - query.shape[2]
        q, k, v, mask = _to_padded_rows(query, key, value, attention_mask, pad)
        return cls(q, k, v, mask, n_blocks, block_size)

    def __init__(self, q, k, v, mask, n_blocks: int, block_size: int):
        rows, _, head_dim = q.shape
        self.rows, self.n_blocks, self.block_size = rows, n_blocks, block_size
        shape = (rows * n_blocks, block_size, head_dim)
        self.query_mask = mask
        self.q, self.k, self.v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        self.token_mask = mask.reshape(rows * n_blocks, block_size)

    def per_row(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[rows * nb, ...]`` -> ``[rows, nb, ...]``."""
        return tensor.reshape(self.rows, self.n_blocks, *tensor.shape[1:])

    def global_block(self, flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-global query and key block numbers (into ``[rows * nb]``) of flat cell indices."""
        # Not `flat_index // nb` nor `arange(rows) * nb`: in an export nb is a shape value, which
        # onnxruntime's CUDA provider computes on the CPU, so each operation with a device tensor
        # would copy it over. Range takes its bounds on the CPU, and lookup tables (built from nb
        # by Range and Expand, which also take it there) keep the arithmetic on the device.
        nb, device = self.n_blocks, flat_index.device
        row_start = _row_starts(self.rows, nb, device)
        query_of_cell, key_of_cell = _cell_coordinates(nb, device)
        query_block = _lookup(query_of_cell, flat_index)  # flat_index // nb
        key_block = _lookup(key_of_cell, flat_index)  # flat_index % nb
        return (row_start + query_block).reshape(-1), (row_start + key_block).reshape(-1)


def _row_starts(rows, stride, device) -> torch.Tensor:
    """``[rows, 1]``: 0, stride, 2 * stride, ..., each row's first position in a flattened
    ``[rows, stride]`` table.

    In an export stride is a shape value, which onnxruntime's CUDA provider computes on the CPU:
    ``arange(rows) * stride`` would copy it to the device, so the table comes from Range, which
    takes its bounds there. Not ``arange(0, rows * stride, stride)`` either: the export cannot
    simplify its length, ``ceil(rows * stride / stride)``, to ``rows``.
    """
    return torch.arange(rows * stride, device=device).reshape(rows, stride)[:, 0, None]


def _cell_coordinates(n_blocks, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables from a flat cell index ``query_block * nb + key_block`` to its query block
    and to its key block (``[nb * nb]`` each)."""
    cell = torch.arange(n_blocks, device=device)
    query_of_cell = cell[:, None].expand(n_blocks, n_blocks).reshape(-1)
    key_of_cell = cell[None, :].expand(n_blocks, n_blocks).reshape(-1)
    return query_of_cell, key_of_cell


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]``: the table's rows (or elements, for a 1-D table) at an index of any
    shape (a Gather in the export)."""
    return table.index_select(0, index.reshape(-1)).reshape(*index.shape, *table.shape[1:])


def _low_resolution(blocks: _Blocks, head_dim: int):
    """Step 2: block means, low-resolution logits (masked after taking the row max)."""
    count = blocks.per_row(blocks.token_mask).sum(dim=-1)  # c[j], [rows, nb]
    denominator = count[..., None] + NORMALISER_EPS
    query_hat = blocks.per_row(blocks.q).sum(dim=-2) / denominator
    key_hat = blocks.per_row(blocks.k).sum(dim=-2) / denominator
    value_hat = blocks.per_row(blocks.v).sum(dim=-2) / denominator
    logits = torch.matmul(query_hat, key_hat.transpose(-1, -2)) / math.sqrt(head_dim)
    row_max = logits.amax(dim=-1, keepdim=True)  # before masking, as the reference does
    empty_pair = (count[:, None, :] * count[:, :, None]) < 0.5
    logits = logits - MASKED_LOGIT_PENALTY * empty_pair.float()
    return logits, row_max, count, value_hat


def _with_priors(scores: torch.Tensor, first_n: int, diagonal_n: int) -> torch.Tensor:
    """Step 3 priors, added one at a time in the reference's order (fp32 rounding matches)."""
    n_blocks = scores.shape[-1]
    cell = torch.arange(n_blocks, device=scores.device)
    if diagonal_n > 0:
        band = (cell[:, None] - cell[None, :]).abs() <= diagonal_n // 2
        scores = scores + band.float() * PRIOR_BONUS
    if first_n > 0:
        first = (cell < first_n).float() * PRIOR_BONUS
        scores = scores + first[:, None]  # the first query-block rows
        scores = scores + first[None, :]  # the first key-block columns
    return scores


def _high_resolution(blocks: _Blocks, flat_index: torch.Tensor, blocks_per_query_block,
                     head_dim: int):
    """Steps 4-6 on the selected blocks; returns per-query sums and the quantised row max."""
    query_block, key_block = blocks.global_block(_chunk_aligned(flat_index))
    logits = _selected_logits(blocks, query_block, key_block, head_dim)
    row_max = _quantised_row_max(blocks, logits.amax(dim=-1), query_block)
    # Step 6 gives masked keys exp(P - M - 1e4) = 0. Without the penalty their weight is at most
    # exp(0.001) (their P is 0 and M >= -0.001), and V is 0 there, so P.V is unchanged; only the
    # normaliser needs the mask. One full-size pass fewer than subtracting the penalty.
    weights = _exp_shifted(logits, row_max.index_select(0, query_block)[..., None])
    del logits
    # Each key's value with its mask as one more column: one product and one per-query-block
    # sum give both P.V and the normaliser (half the nodes of the export's sums).
    value_and_real = torch.cat((blocks.v, blocks.token_mask[..., None]), dim=-1)  # [.., Tk, D+1]
    sums = _sum_per_query_block(torch.matmul(weights, value_and_real.index_select(0, key_block)),
                                query_block, blocks_per_query_block)
    return sums[..., :head_dim], sums[..., head_dim], row_max


def _chunk_aligned(flat_index: torch.Tensor) -> torch.Tensor:
    """The exported per-query-block sum takes each row's blocks in whole chunks of
    ``SEGMENT_CHUNK``. Padding each row's ``[rows, k]`` list of selected cells makes the products
    come out whole chunks, instead of padding the products themselves (a 100 MB copy at 4096
    tokens). The padding repeats the row's last cell: its products are computed but never
    summed, and its logits leave the row maxima as they are. The eager ``index_add`` needs no
    padding."""
    if not exporting():
        return flat_index
    # The last cell repeated and concatenated rather than F.pad: onnxruntime's CUDA provider
    # has no int64 Pad, so the lists would make a round trip through the host.
    k = flat_index.shape[1]
    whole_chunks = (k + SEGMENT_CHUNK - 1) // SEGMENT_CHUNK * SEGMENT_CHUNK  # a product, so that
    padding = flat_index[:, -1:].expand(-1, whole_chunks - k)  # the export can split it in chunks
    return torch.cat((flat_index, padding), dim=1)


def _selected_logits(blocks: _Blocks, query_block, key_block, head_dim: int) -> torch.Tensor:
    """Step 4: the 32x32 logits of each selected block (gathered Q and K freed on return)."""
    q = blocks.q.index_select(0, query_block)  # [rows * k, T, D]
    k = blocks.k.index_select(0, key_block)
    logits = torch.matmul(q, k.transpose(-1, -2))
    scale = math.sqrt(head_dim)
    return logits / scale if logits.requires_grad else logits.div_(scale)


def _exp_shifted(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``exp(logits - shift)``, in place when no gradient is recorded: one block-sized tensor
    instead of three (tracing for export turns the in-place ops into ordinary ones)."""
    if logits.requires_grad:
        return torch.exp(logits - shift)  # autograd needs the logits as they were
    return logits.sub_(shift).exp_()


def running_eagerly() -> bool:
    """Neither exporting, compiling nor capturing a CUDA graph: checks that read tensor values
    (and so wait for the device) may run."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (exporting() or torch.compiler.is_compiling() or capturing)


def exporting() -> bool:
    """Whether this call is being traced for export (ONNX, or torch.export beneath it).

    ``torch.onnx.is_in_onnx_export`` alone is not enough on every torch: 2.6's dynamo export left
    it False, and the eager ``index_add`` below was exported as a racing ScatterND.
    """
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _sum_per_query_block(values: torch.Tensor, query_block: torch.Tensor,
                         blocks_per_query_block: torch.Tensor) -> torch.Tensor:
    """Sum the selected blocks' ``values`` into their query blocks (``[rows * nb, ...]``), given
    each row's ``[rows, nb]`` blocks per query block; ``query_block`` and ``values`` may carry
    ``_chunk_aligned``'s padding, which is not summed.

    Eagerly this is ``index_add``. In an ONNX export it is ``_sorted_segment_sum`` instead:
    onnxruntime's CPU ScatterND with reduction="add" races on repeated indices when it runs on
    several threads (microsoft/onnxruntime#18048; measured here with 1.32), ScatterElements is
    serial (0.29 s for 4096 tokens), and a float32 prefix sum over all blocks loses 4e-3.
    """
    if not exporting():
        out = torch.zeros(blocks_per_query_block.numel(), *values.shape[1:], device=values.device)
        return out.index_add(0, query_block, values)
    return _sorted_segment_sum(values, blocks_per_query_block)


SEGMENT_CHUNK = 16  # blocks per float32 partial prefix sum


def _sorted_segment_sum(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of each row's blocks: ``values`` holds ``[rows * k', ...]``,
    each row's k' blocks in whole chunks (see ``_chunk_aligned``), and segment n of row r has
    ``counts[r, n]`` blocks (``[rows, nb]``); returns ``[rows * nb, ...]``.

    Difference of prefix sums, in two levels so that float32 stays exact enough: within chunks of
    16 blocks in float32 (small partial sums), and over a row's whole chunks in float64 (16x less
    data than a float64 prefix of everything). As precise as a float32 ``index_add``,
    deterministic, and one pass over ``values`` (the cumsum): everything else touches one row per
    segment. Blocks after a row's last segment are never read. Every scan runs along a row, never
    across the batch: onnxruntime's CUDA CumSum costs ``n² / 2`` reads for a scan of ``n`` (see
    ``_running_count``), and one over the whole batch's chunks came to 3.9e10 reads at batch 8
    and 4096 tokens (docs/gpu.md).
    """
    rows, n_blocks = counts.shape
    width = math.prod(values.shape[1:])
    inclusive = torch.cumsum(values.reshape(rows, -1, SEGMENT_CHUNK, width), dim=2)
    chunks = inclusive.shape[1]
    totals = inclusive[:, :, -1].double()
    before_chunk = F.pad(torch.cumsum(totals, dim=1), (0, 0, 1, 0))  # [rows, chunks + 1], exclusive
    end = torch.cumsum(counts, dim=1)  # row-local block positions
    start = end - counts
    # Each row's first block and first chunk in the flattened tables.
    block_base = _row_starts(rows, chunks * SEGMENT_CHUNK, values.device)
    chunk_base = _row_starts(rows, chunks + 1, values.device)
    inclusive, before_chunk = inclusive.reshape(-1, width), before_chunk.reshape(-1, width)

    def prefix(position):  # the sum of the row's blocks before `position`, in its two parts
        chunk = torch.div(position, SEGMENT_CHUNK, rounding_mode="floor")
        in_chunk = (position - chunk * SEGMENT_CHUNK > 0).float()[..., None]  # none at a chunk start
        within = _lookup(inclusive, block_base + torch.clamp(position - 1, min=0)) * in_chunk
        return _lookup(before_chunk, chunk_base + chunk), within

    (end_chunks, end_within), (start_chunks, start_within) = prefix(end), prefix(start)
    sums = (end_chunks - start_chunks).float() + (end_within - start_within)
    return sums.reshape(rows * n_blocks, *values.shape[1:])


def _quantised_row_max(blocks: _Blocks, block_max: torch.Tensor, query_block: torch.Tensor):
    """Step 5: max over the row's selected blocks of trunc(x * 1000), divided by 1000, from each
    selected block's per-query maximum ``[rows * k, Tq]``.

    The kernel truncates each fp32 product to int and takes an integer max starting from -1e8;
    trunc commutes with max, and fp32 division by 1000 equals the kernel's double division for
    every integer below 2**24 in magnitude.
    """
    quantised = torch.trunc(block_max * ROW_MAX_SCALE)
    row_max = _max_per_query_block(blocks, quantised, query_block, EMPTY_ROW_MAX)
    return row_max / ROW_MAX_SCALE


def _max_per_query_block(blocks: _Blocks, values: torch.Tensor, query_block: torch.Tensor,
                         start: float) -> torch.Tensor:
    """``[rows * k, T]`` per-block values -> ``[rows * nb, T]``: the max over each query
    block's selected blocks, ``start`` where it has none."""
    initial = torch.full((blocks.rows * blocks.n_blocks, blocks.block_size), start,
                         device=values.device)
    index = query_block[:, None].expand(-1, blocks.block_size)
    return initial.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def _combine_full(blocks, hi_out, hi_norm, quantised_max, low_logits, row_max, exact, count,
                  value_hat):
    """Step 7, mode ``full``: add the low-resolution term and rescale both to a common max."""
    low = torch.exp(low_logits - row_max - MASKED_LOGIT_PENALTY * exact) * count[:, None, :]
    lo_out = torch.matmul(low, value_hat)[:, :, None, :]  # [rows, nb, 1, D], same for a block
    lo_norm = low.sum(dim=-1)[:, :, None]  # [rows, nb, 1]

    max_gap = (row_max - blocks.per_row(quantised_max)) * blocks.per_row(blocks.token_mask)
    lo_scale = torch.exp(torch.clamp(max_gap, max=0.0))  # [rows, nb, T]
    hi_scale = torch.exp(-torch.clamp(max_gap, min=0.0))

    hi_out = blocks.per_row(hi_out) * hi_scale[..., None]
    hi_norm = blocks.per_row(hi_norm) * hi_scale
    numerator = hi_out + lo_out * lo_scale[..., None]
    denominator = hi_norm + lo_norm * lo_scale + NORMALISER_EPS
    return (numerator / denominator[..., None]).reshape(blocks.rows, -1, hi_out.shape[-1])


def _to_padded_rows(query, key, value, attention_mask, pad: int):
    """Step 1: Q, K and V times the mask, as fp32 ``[batch * heads, seq + pad, D]`` rows, and
    each row's own ``[.., seq + pad]`` mask."""
    batch, heads, seq_len, head_dim = query.shape
    mask = F.pad((attention_mask != 0).float().to(query.device), (0, pad))
    token_mask = mask[:, None, :, None]  # [B, 1, S + pad, 1]

    def rows_of(tensor):
        masked = _masked_and_padded(tensor, token_mask, pad)
        return masked.reshape(batch * heads, seq_len + pad, head_dim)

    row_mask = mask[:, None, :].expand(batch, heads, seq_len + pad).reshape(batch * heads, -1)
    return rows_of(query), rows_of(key), rows_of(value), row_mask


def _masked_and_padded(tensor, token_mask, pad: int) -> torch.Tensor:
    """``tensor * mask`` padded by ``pad`` masked positions, as a contiguous fp32 tensor.

    Q, K and V arrive as head-transposed views, so padding, reshaping and masking them would copy
    each three times; eagerly without gradients one pass writes straight into the padded rows.
    Autograd and traced calls (torch.compile, and export, which traces as compiling) get the two
    ordinary ops.
    """
    if tensor.requires_grad or torch.compiler.is_compiling():
        return F.pad(tensor.float(), (0, 0, 0, pad)) * token_mask
    batch, heads, seq_len, head_dim = tensor.shape
    out = torch.empty(batch, heads, seq_len + pad, head_dim, device=tensor.device)
    torch.mul(tensor, token_mask[:, :, :seq_len], out=out[:, :, :seq_len])
    out[:, :, seq_len:] = 0
    return out


def _check_arguments(query, key, value, attention_mask, num_blocks, approx_mode, block_size,
                     first_n, diagonal_n) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise InputError(f"{name} must be [batch, heads, seq, head_dim], got shape "
                             f"{tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise InputTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if key.shape != query.shape or value.shape != query.shape:
        raise InputError("query, key and value must have the same shape, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise InputError("query, key and value must have the same dtype, got "
                         f"{query.dtype}, {key.dtype} and {value.dtype}")
    if query.shape[2] == 0 or query.shape[3] == 0:
        raise InputError(f"seq and head_dim must be at least 1, got shape {tuple(query.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise InputTypeError("attention_mask must be a torch.Tensor or None, got "
                                 f"{type(attention_mask).__name__}")
        expected = (query.shape[0], query.shape[2])
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
            raise InputError(f"attention_mask must be [batch, seq] = {list(expected)}, got shape "
                             f"{tuple(attention_mask.shape)}")
    _check_int("num_blocks", num_blocks, minimum=1)
    _check_int("block_size", block_size, minimum=1)
    _check_int("initial_prior_first_n_blocks", first_n, minimum=0)
    _check_int("initial_prior_diagonal_n_blocks", diagonal_n, minimum=0)
    if approx_mode not in APPROX_MODES:
        raise InputError(f"approx_mode must be one of {APPROX_MODES}, got {approx_mode!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
