"""Task agreement of an int8 export with the float32 PyTorch model, on the parity inputs.

Quantization moves every output a little, so an absolute tolerance says little about whether the
model still answers the same. What is checked instead is the answer, per task:

- text-classification, multiple-choice: the argmax label of each sequence;
- token-classification, fill-mask: the argmax label of each real (unpadded) token;
- question-answering: the start and the end argmax of each sequence, over its real tokens;
- feature-extraction: the cosine similarity of each real token's hidden state.

An agreement must be above ``AGREEMENT_THRESHOLD`` and the smallest cosine above
``COSINE_THRESHOLD``; a head below either fails.
"""

from __future__ import annotations

import dataclasses

import numpy as np

AGREEMENT_THRESHOLD = 0.99  # share of argmaxes equal to PyTorch's; must be above it
COSINE_THRESHOLD = 0.999  # every real token's hidden state against PyTorch's; must be above it


@dataclasses.dataclass
class AgreementResult:
    metric: str  # e.g. "argmax label"
    value: float  # the share that agrees, or the smallest cosine similarity
    threshold: float  # value must be above it
    count: int  # how many sequences or tokens were compared
    unit: str  # "sequences" or "tokens"
    mean: float | None = None  # cosine: the mean over the tokens as well
    # argmax: the widest gap between PyTorch's top two scores where the argmax differs (random
    # weights leave near ties, which any quantization error flips)
    widest_flipped_margin: float | None = None

    @property
    def passed(self) -> bool:
        return self.value > self.threshold

    def describe(self) -> str:
        if self.mean is None:
            flips = ("" if self.widest_flipped_margin is None else
                     f"; PyTorch's top two within {self.widest_flipped_margin:.2g} where not")
            return (f"{self.value:.2%} of {self.count} {self.unit} agree (> "
                    f"{self.threshold:.0%}){flips}")
        return (f"min {self.value:.6f}, mean {self.mean:.6f} over {self.count} {self.unit} "
                f"(min > {self.threshold:g})")


def argmax_agreement(expected: list[np.ndarray], actual: list[np.ndarray],
                     masks: list[np.ndarray | None], metric: str, unit: str) -> AgreementResult:
    """The share of positions whose argmax over the last axis agrees. ``masks`` (one per array,
    the shape without the last axis, or None for all) say which positions count."""
    agree = total = 0
    flipped_margins = []
    for want, got, mask in zip(expected, actual, masks):
        same = np.argmax(want, axis=-1) == np.argmax(got, axis=-1)
        counted = np.ones(same.shape, bool) if mask is None else mask.astype(bool)
        agree += int(same[counted].sum())
        total += int(counted.sum())
        flipped_margins.extend(top_two_margin(want)[counted & ~same].tolist())
    return AgreementResult(metric, agree / total, AGREEMENT_THRESHOLD, total, unit,
                           widest_flipped_margin=max(flipped_margins, default=None))


def top_two_margin(scores: np.ndarray) -> np.ndarray:
    """The best score minus the second best, over the last axis (inf where only one is finite)."""
    if scores.shape[-1] < 2:
        return np.full(scores.shape[:-1], np.inf)
    top_two = np.sort(scores, axis=-1)[..., -2:]
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(top_two[..., 1] - top_two[..., 0], nan=np.inf)


def cosine_agreement(expected: list[np.ndarray], actual: list[np.ndarray],
                     masks: list[np.ndarray]) -> AgreementResult:
    """The smallest (and the mean) cosine similarity of the vectors on the last axis, over the
    real tokens."""
    cosines = []
    for want, got, mask in zip(expected, actual, masks):
        a, b = want[mask.astype(bool)].astype(np.float64), got[mask.astype(bool)].astype(np.float64)
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        cosines.append((a * b).sum(-1) / np.maximum(norms, np.finfo(np.float64).tiny))
    values = np.concatenate(cosines)
    return AgreementResult("cosine similarity", float(values.min()), COSINE_THRESHOLD,
                           int(values.size), "tokens", mean=float(values.mean()))


def real_tokens_only(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``logits`` [sequences, tokens] with padding at -inf: a padded token is no answer."""
    return np.where(mask.astype(bool), logits, -np.inf)


def task_agreement(task_name: str, expected: list[dict], actual: list[dict],
                   masks: list[np.ndarray]) -> list[AgreementResult]:
    """The agreement checks of ``task_name``: ``expected`` and ``actual`` hold one dict of outputs
    per feed, ``masks`` each feed's attention_mask."""
    def outputs(name, results):
        return [np.asarray(result[name], np.float32) for result in results]

    if task_name in ("text-classification", "multiple-choice"):
        label = "argmax label" if task_name == "text-classification" else "argmax choice"
        return [argmax_agreement(outputs("logits", expected), outputs("logits", actual),
                                 [None] * len(masks), label, "sequences")]
    if task_name in ("token-classification", "fill-mask"):
        return [argmax_agreement(outputs("logits", expected), outputs("logits", actual), masks,
                                 "per-token argmax", "tokens")]
    if task_name == "question-answering":
        def over_real_tokens(name, results):
            return [real_tokens_only(logits, mask)
                    for logits, mask in zip(outputs(name, results), masks)]

        return [argmax_agreement(over_real_tokens(name, expected), over_real_tokens(name, actual),
                                 [None] * len(masks), f"{name.split('_')[0]} argmax", "sequences")
                for name in ("start_logits", "end_logits")]
    if task_name == "feature-extraction":
        return [cosine_agreement(outputs("last_hidden_state", expected),
                                 outputs("last_hidden_state", actual), masks)]
    raise ValueError(f"no agreement check for task {task_name!r}")
