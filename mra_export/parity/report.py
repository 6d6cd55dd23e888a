"""Parity results: per backend and output, and per attention head; JSON and a table."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text, check_writable_file
from .agreement import AgreementResult


@dataclasses.dataclass
class OutputResult:
    max_abs: float
    max_rel: float
    tolerance: float | None  # None: reported only (int8 is judged by task agreement)

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.max_abs <= self.tolerance


@dataclasses.dataclass
class AttentionResult:
    """Every (layer, head) attention context against PyTorch: the per-head diagnostic."""

    per_head_max_abs: list[list[float]]  # [layer][head]
    tolerance: float

    @property
    def max_abs(self) -> float:
        return max(max(row) for row in self.per_head_max_abs)

    @property
    def first_divergence(self) -> dict | None:
        for layer, row in enumerate(self.per_head_max_abs):
            for head, value in enumerate(row):
                if not value <= self.tolerance:
                    return {"layer": layer, "head": head, "max_abs": value}
        return None

    @property
    def passed(self) -> bool:
        return self.first_divergence is None


@dataclasses.dataclass
class BackendResult:
    backend: str
    source: str
    status: str  # "passed", "failed", "skipped" or "error"
    reason: str | None = None  # why it was skipped, the error, or a note on what did not run
    outputs: dict[str, OutputResult] = dataclasses.field(default_factory=dict)
    attention: AttentionResult | None = None
    agreement: list[AgreementResult] = dataclasses.field(default_factory=list)  # int8


@dataclasses.dataclass
class ParityReport:
    model: str
    task: str
    inputs: list[dict]
    backends: list[BackendResult]

    @property
    def checked(self) -> int:
        """How many backends ran (the others were skipped here, each with its reason)."""
        return sum(b.status != "skipped" for b in self.backends)

    @property
    def passed(self) -> bool:
        """Every backend that ran passed, and at least one ran: nothing checked is no proof."""
        return self.checked > 0 and all(b.status in ("passed", "skipped") for b in self.backends)

    def to_dict(self) -> dict:
        def with_properties(result):
            data = dataclasses.asdict(result)
            for name, output in result.outputs.items():
                data["outputs"][name]["passed"] = output.passed
            if result.attention:
                data["attention"].update(max_abs=result.attention.max_abs,
                                         first_divergence=result.attention.first_divergence,
                                         passed=result.attention.passed)
            for entry, agreement in zip(data["agreement"], result.agreement):
                entry["passed"] = agreement.passed
            if not result.agreement:  # float backends' reports as before
                del data["agreement"]
            return data

        return {"model": self.model, "task": self.task, "passed": self.passed,
                "checked": self.checked,
                "inputs": self.inputs, "backends": [with_properties(b) for b in self.backends]}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


def check_report_path(path: str | Path) -> None:
    """A one-line error unless ``path`` is new or an earlier parity report (which it replaces):
    a mistyped --report must not overwrite a config.json or a model.onnx."""
    if not str(path).strip():  # before Path(), which makes "" the current folder
        raise UserError("--report takes a file name, got ''")
    path = Path(path)
    check_writable_file(path)
    if os.path.lexists(path) and not _is_parity_report(path):
        raise UserError(f"{path} exists and is not a parity report; choose a new file name")


def _is_parity_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    reports = data if isinstance(data, list) else [data]  # the demo's holds one per head
    return all(isinstance(r, dict) and {"task", "backends", "passed"} <= r.keys() for r in reports)


HEADER = ("head", "backend", "output", "max abs", "max rel", "tolerance", "result")


def table_rows(report: ParityReport) -> list[tuple[str, ...]]:
    rows = []
    for result in report.backends:
        if result.status in ("skipped", "error"):
            rows.append((report.task, result.backend, "-", "-", "-", "-",
                         f"{result.status}: {result.reason}"))
            continue
        for name, output in result.outputs.items():
            judged = output.tolerance is not None
            rows.append((report.task, result.backend, name, f"{output.max_abs:.2e}",
                         f"{output.max_rel:.2e}", f"{output.tolerance:g}" if judged else "-",
                         ("pass" if output.passed else "FAIL") if judged else "reported"))
        for agreement in result.agreement:
            rows.append((report.task, result.backend, agreement.metric, "-", "-",
                         f"> {agreement.threshold:g}",
                         f"{'pass' if agreement.passed else 'FAIL'}: {agreement.describe()}"))
        if result.attention is None and result.reason:
            rows.append((report.task, result.backend, "attention", "-", "-", "-", result.reason))
        if result.attention:
            attention = result.attention
            layers, heads = len(attention.per_head_max_abs), len(attention.per_head_max_abs[0])
            divergence = attention.first_divergence
            verdict = "pass" if divergence is None else (
                f"FAIL: first diverges at layer {divergence['layer']}, head {divergence['head']}")
            rows.append((report.task, result.backend, f"attention ({layers}x{heads} heads)",
                         f"{attention.max_abs:.2e}", "-", f"{attention.tolerance:g}", verdict))
    return rows


def format_table(reports: list[ParityReport]) -> str:
    rows = [HEADER] + [row for report in reports for row in table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 6)
    return "\n".join(lines)
