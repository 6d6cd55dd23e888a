"""How a native implementation (the CUDA kernels, the CPU twin) is judged against ``mra_attention``.

MRA's output is discontinuous in two places, so two correct implementations whose float32 sums
run in different orders can disagree by more than rounding:
- a selection score within an ulp of the k-th largest can be selected by one and not the other;
- a query's largest logit within an ulp of a 1e-3 step can be truncated to either step, which
  rescales the high-resolution part against the low-resolution one by exp(1e-3).
The comparison holds every other query to the tolerance, accepts those two cases only where the
reference itself is that close to the edge (and only rarely), and reports how many there were.
"""

from __future__ import annotations

import dataclasses

import torch

from .attention import ROW_MAX_SCALE, block_selection, mra_attention

TIE_DISTANCE = 1e-5  # relative to max(1, |threshold|): a score this close may order either way
STEP_DISTANCE = 2e-5  # absolute: a logit this close to a 1e-3 step may truncate either way
STEP_ERROR = 2e-3  # a flipped step moves an output by about 1e-3 of the row's scale
MAX_EDGE_FRACTION = 1e-3  # edge cases allowed among all queries


@dataclasses.dataclass
class KernelComparison:
    max_error: float  # over the queries held to the tolerance (relative to max |out| if asked)
    tolerance: float
    queries: int
    step_queries: int  # queries past the tolerance whose largest logit sits on a 1e-3 step
    step_error: float  # their largest error, relative to the largest |output|
    tied_blocks: int  # selected cells that differ, each within an ulp of the threshold
    untied_blocks: int  # selected cells that differ although the reference is not near a tie

    @property
    def same_blocks(self) -> bool:
        return self.tied_blocks == 0 and self.untied_blocks == 0

    @property
    def passed(self) -> bool:
        rare = self.step_queries + self.tied_blocks <= MAX_EDGE_FRACTION * self.queries
        return (self.max_error <= self.tolerance and self.untied_blocks == 0 and rare
                and self.step_error <= STEP_ERROR)

    def summary(self) -> str:
        return (f"max error {self.max_error:.2e} (tolerance {self.tolerance:.0e}); "
                f"{self.step_queries} queries on a 1e-3 step (error up to {self.step_error:.1e} of "
                f"the largest output); "
                f"{self.tied_blocks} blocks swapped at a tie, {self.untied_blocks} otherwise")


def compare_with_reference(output: torch.Tensor, selected: torch.Tensor, query: torch.Tensor,
                           key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, *,
                           tolerance: float, relative: bool = False,
                           **settings) -> KernelComparison:
    """``output [B, H, S, D]`` and ``selected [B * H, k]`` of a native call on these inputs,
    against ``mra_attention`` in float32. ``relative``: errors divided by the largest |output|."""
    query, key, value = query.float(), key.float(), value.float()
    expected = mra_attention(query, key, value, mask, **settings)
    selection_settings = {name: v for name, v in settings.items() if name != "approx_mode"}
    reference = block_selection(query, key, mask, **selection_settings)
    block_size = settings.get("block_size", 32)
    batch, heads, seq_len, _ = query.shape
    error = (output.float() - expected).abs().amax(dim=-1).reshape(batch * heads, seq_len)
    error_of_largest = error / expected.abs().max().clamp_min(1e-30).item()
    judged = error_of_largest if relative else error

    differs = _chosen(selected, reference.chosen) != reference.chosen
    near_tie = ((reference.scores - reference.threshold).abs()
                <= TIE_DISTANCE * reference.threshold.abs().clamp_min(1.0))
    # Queries whose block row was selected differently (judged by the tie count instead):
    reselected = _per_query(differs, block_size, seq_len)
    logit_max = reference.logit_max[:, :seq_len] * ROW_MAX_SCALE
    on_step = (logit_max - torch.round(logit_max)).abs() <= STEP_DISTANCE * ROW_MAX_SCALE
    stepped = on_step & ~reselected & (judged > tolerance)
    held = ~(stepped | reselected)
    return KernelComparison(
        max_error=_max(judged[held]), tolerance=tolerance, queries=error.numel(),
        step_queries=int(stepped.sum()), step_error=_max(error_of_largest[stepped]),
        tied_blocks=int((differs & near_tie).sum()), untied_blocks=int((differs & ~near_tie).sum()))


def _chosen(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[rows, k]`` flat cell indices -> a ``[rows, nb * nb]`` mask shaped ``like``."""
    return torch.zeros_like(like).scatter(1, indices.to(like.device).long(), True)


def _per_query(differs: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """``[rows, nb * nb]`` cell flags -> ``[rows, seq_len]``: the query's block row has one."""
    n_blocks = -(-seq_len // block_size)
    block_row = differs.reshape(differs.shape[0], n_blocks, n_blocks).any(dim=-1)
    return block_row.repeat_interleave(block_size, dim=1)[:, :seq_len]


def _max(values: torch.Tensor) -> float:
    return values.max().item() if values.numel() else 0.0
