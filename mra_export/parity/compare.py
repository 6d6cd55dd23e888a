"""Running backends against PyTorch with Polygraphy's Comparator, output by output, and the
per-attention-head diagnostic from the same runs."""

from __future__ import annotations

import numpy as np
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.logger import G_LOGGER

from ..errors import UserError
from .agreement import task_agreement
from .backends import Backend
from .report import AttentionResult, BackendResult, OutputResult
from .runners import ExportedModelRunner


def run_quietly(runners, feeds) -> RunResults:
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        return Comparator.run(runners, data_loader=feeds)


def check_backend(backend: Backend, reference: RunResults, feeds, task, input_names,
                  contexts: list[str]) -> BackendResult:
    """Run one backend on ``feeds`` and compare it with the PyTorch ``reference`` results."""
    if backend.skipped:
        return BackendResult(backend.name, backend.source, "skipped", backend.skipped)
    contexts = contexts if backend.attention else []
    runner = ExportedModelRunner(backend.load, task, input_names, contexts, name=backend.name)
    try:
        results = run_quietly([runner], feeds)
    except UserError as error:
        return BackendResult(backend.name, backend.source, "error", str(error))
    except Exception as error:  # a runtime's own failure: report it, check the others
        message = str(error).strip().splitlines()
        return BackendResult(backend.name, backend.source, "error",
                             f"{type(error).__name__}: {message[0] if message else ''}")
    pair = RunResults(list(reference.items()) + list(results.items()))
    outputs = _compare_outputs(pair, task.outputs, backend.tolerance)
    agreement = _agreement(pair, task, feeds) if backend.agreement else []
    try:
        attention = AttentionResult(_per_head_max_abs(pair, contexts), backend.tolerance) if contexts else None
    except ShapeMismatch as error:  # the others still get checked
        return BackendResult(backend.name, backend.source, "error", str(error), outputs=outputs)
    passed = (all(o.passed for o in outputs.values()) and (attention is None or attention.passed)
              and all(a.passed for a in agreement))
    note = None if contexts else f"per-head diagnostic not run: {backend.no_attention}"
    return BackendResult(backend.name, backend.source, "passed" if passed else "failed",
                         reason=note, outputs=outputs, attention=attention, agreement=agreement)


def _agreement(pair: RunResults, task, feeds):
    """The task's agreement with PyTorch over every feed (int8 backends)."""
    (_, expected), (_, actual) = pair.items()
    masks = [np.asarray(feed["attention_mask"]) for feed in feeds]
    return task_agreement(task.name, list(expected), list(actual), masks)


def _compare_outputs(pair: RunResults, names, tolerance: float | None) -> dict[str, OutputResult]:
    # None: the errors are measured and reported, not judged (int8, judged by agreement)
    compare = SimpleCompareFunc(atol=np.inf if tolerance is None else tolerance, rtol=0.0,
                                check_error_stat="max")
    # polygraphy computes each output's logged percentiles even when silenced; numpy 2.2.6
    # (Python 3.10's newest; not 1.26.4 or 2.4.6) overflows there on float16 outputs and warned
    # on stderr. The maxima judged below are not computed there.
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(over="ignore", invalid="ignore"):
        accuracy = Comparator.compare_accuracy(pair, compare_func=compare)
    iterations = next(iter(accuracy[0].values()))  # one compare function, one runner pair
    return {name: OutputResult(max(it[name].max_absdiff for it in iterations),
                               max(it[name].max_reldiff for it in iterations), tolerance)
            for name in names}


class ShapeMismatch(ValueError):
    """An exported attention context that cannot be compared head by head with PyTorch's."""


def _per_head_max_abs(pair: RunResults, contexts: list[str]) -> list[list[float]]:
    (_, expected), (_, actual) = pair.items()
    rows = []
    for name in contexts:
        worst = None
        for want, got in zip(expected, actual):
            if want[name].shape != got[name].shape:
                raise ShapeMismatch(f"{name} has shape {list(got[name].shape)}, PyTorch's "
                                    f"{list(want[name].shape)}")
            diff = np.abs(want[name].astype(np.float64) - got[name].astype(np.float64))
            per_head = diff.max(axis=(0, 2, 3))
            worst = per_head if worst is None else np.maximum(worst, per_head)
        rows.append([float(v) for v in worst])
    return rows
