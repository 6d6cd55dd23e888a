"""``mra-export demo``: the whole pipeline on the built-in default checkpoint.

default checkpoint (six heads) -> patched PyTorch vs transformers -> ONNX export of every head in
both flavours -> TensorRT engines where TensorRT and a GPU are present -> parity of every backend
-> one table. Whatever cannot run here is listed with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .checkpoints import build_default_checkpoints, load_model
from .export import FLAVOURS, export_model, reusing_traces
from .files import atomic_write_text, folder_filled_in_place
from .parity import format_table, run_parity
from .patching import patch_model
from .tasks import TASKS
from .transformers_reference import padding_unsupported_reason, transformers_model_outputs

SAMPLE_TEXTS = [
    "Long documents need attention whose cost grows linearly with the number of tokens.",
    "What does MRA compute?",
    "Multi-resolution analysis keeps a few exact blocks and summarises the others by their "
    "means, so a transformer encoder can read a sentence, a question and a passage " * 3,
]
# transformers needs a multiple of 32 with num_blocks <= (S / 32) ** 2: 64 blocks -> 256.
SAMPLE_LENGTH = 256
SUMMARY = "parity.json"  # also what marks a folder as an earlier demo's, to be replaced
# All an earlier demo holds: a folder with a parity report of the user's and more is not one.
DEMO_ENTRIES = frozenset({"checkpoints", "onnx", "engines", SUMMARY})


def run_demo(out: str | Path = "out/demo", log=print) -> bool:
    """The whole pipeline under ``out``, made in place (its exports record their checkpoints'
    paths): a failed or stopped demo leaves ``out`` as it was; an earlier demo is replaced."""
    with folder_filled_in_place(out, SUMMARY, holds_only=DEMO_ENTRIES):
        return _run_demo(Path(out), log)


def _run_demo(out: Path, log) -> bool:
    log(f"== building the default checkpoint (six heads) under {out / 'checkpoints'}")
    checkpoints = build_default_checkpoints(out / "checkpoints")

    log("\n== patched PyTorch vs transformers' own MRA (its CUDA primitives reproduced on the "
        "CPU), ragged batch of 3, one sample at a time on the transformers side")
    reason = padding_unsupported_reason()
    log(f"   skipped: {reason}" if reason else _torch_table(checkpoints))

    log(f"\n== exporting every head in both flavours under {out / 'onnx'}")
    exports = {}
    with reusing_traces():  # the heads share one attention
        for task in TASKS:
            exports[task] = {}
            for flavour in FLAVOURS:
                folder = out / "onnx" / f"{task}-{flavour}"
                export_model(checkpoints[task], folder, task, flavour, log=_silent)
                exports[task][flavour] = folder
            log(f"   {task}: {', '.join(str(folder) for folder in exports[task].values())}")

    engines = _engines(checkpoints, exports, out, log)

    log("\n== parity: every backend against the patched PyTorch model")
    reports = []
    for task in TASKS:
        reports.append(run_parity(checkpoints[task], list(exports[task].values()),
                                  engines.get(task, []), log=_silent))
    log(format_table(reports))
    summary = out / SUMMARY
    atomic_write_text(summary, json.dumps([r.to_dict() for r in reports], indent=2))
    passed = all(report.passed for report in reports)
    log(f"\nparity report: {summary}\n{'ALL PASSED' if passed else 'FAILURES ABOVE'}")
    return passed


def _silent(message: str) -> None:
    pass


def _torch_table(checkpoints: dict) -> str:
    rows = [("head", "output", "shape", "max abs vs transformers")]
    for task_name, folder in checkpoints.items():
        task = TASKS[task_name]
        reference = load_model(folder, task)[0]
        patched = patch_model(load_model(folder, task)[0], attention="reference")
        inputs = _sample_batch(folder, task)
        with torch.no_grad():
            ours = patched(**inputs)
        theirs = transformers_model_outputs(reference, task, inputs)
        for name in task.outputs:
            diff = (ours[name] - theirs[name]).abs().max().item()
            rows.append((task_name, name, str(list(ours[name].shape)), f"{diff:.2e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3]
                     for row in rows)


def _sample_batch(folder, task) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(SAMPLE_TEXTS, padding="max_length", max_length=SAMPLE_LENGTH,
                        truncation=True, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if task.has_choices:  # the same texts as two choices, the second one reversed
        inputs = {name: torch.stack([t, t.flip(0)], dim=1) for name, t in inputs.items()}
    return inputs


def _engines(checkpoints: dict, exports: dict, out: Path, log) -> dict:
    """TensorRT engines of every head, where TensorRT and a GPU are present."""
    from .engines.availability import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        log(f"\n== TensorRT engines: skipped ({reason})")
        return {}
    from .engines.demo import build_demo_engines

    log(f"\n== building TensorRT engines (fp32, fp16) under {out / 'engines'}")
    plugin_exports = {task: folders["plugin"] for task, folders in exports.items()}
    return build_demo_engines(checkpoints, plugin_exports, out, log)
