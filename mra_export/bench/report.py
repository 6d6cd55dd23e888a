"""Bench results: a Markdown table, PNG plots, and the checks against issue 6's targets (and
issue 25's where the GPU columns ran)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..files import atomic_write_bytes, atomic_write_text

TARGET_LENGTH, GROWTH_FROM = 4096, 512
# Retired (issue 6, restated): the ratio hangs on the CPU's matrix products, which neither
# runtime's attention changes (tools/speed_ceiling.py). Reported for information, not judged.
SPEEDUP_OVER_PYTORCH = 2.0  # onnxruntime MRA against the patched PyTorch model
# Memory is judged on onnxruntime, the deployment path; PyTorch's peak is reported beside it.
MEMORY_JUDGED_ON = ("onnxruntime",)
INT8_SPEEDUP = 1.5  # issue 28: int8 onnxruntime MRA against fp32 onnxruntime MRA
ORT_CUDA_SHARE = 0.7  # issue 25: MRA's portable graph against dense on onnxruntime-cuda, at most
JSON_NAME = "bench.json"  # also what marks a folder as an earlier bench's, to be replaced


def ms(result) -> str:
    return f"{result['median_s'] * 1e3:.1f}" if result and "median_s" in result else "-"


def mb(result) -> str:
    return f"{result['peak_memory_mb']:.0f}" if result and "peak_memory_mb" in result else "-"


def markdown(run: dict) -> str:
    names = [b["name"] for b in run["backends"] if not b.get("skipped")]
    lines = [f"Command: `{run['command']}`  ", f"Machine: {run['machine']}  ",
             f"Model: {run['model']}; times are medians of repeated runs after a warm-up, memory "
             "the peak working set of one run.", "",
             "| batch | tokens | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"{n} MB" for n in names) + " |",
             "|---" * (2 + 2 * len(names)) + "|"]
    for row in run["results"]:
        cells = [str(row["batch"]), str(row["length"])]
        cells += [ms(row["backends"].get(n)) for n in names]
        cells += [mb(row["backends"].get(n)) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [b for b in run["backends"] if b.get("skipped")]
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{b['name']} ({b['skipped']})" for b in skipped)]
    notes = [f"batch {r['batch']}, {r['length']} tokens, {n}: {res['skipped']}"
             for r in run["results"] for n, res in r["backends"].items() if "skipped" in res]
    if notes:
        lines += ["", "Skipped cells: " + "; ".join(notes)]
    lines += ["", "Targets:", ""] + ([f"- {_verdict(t['met'])}: {t['text']}"
                                      for t in run["targets"]] or
                                     [f"- not evaluated: the CPU ones need batch 1 at {GROWTH_FROM} "
                                      f"and {TARGET_LENGTH} tokens (the default lengths), the GPU "
                                      f"ones {TARGET_LENGTH} tokens at batch 1 or 8"])
    return "\n".join(lines) + "\n"


def _verdict(met: bool | None) -> str:
    return "info" if met is None else "met" if met else "NOT MET"


def targets(run: dict) -> list[dict]:
    """Issue 6's targets, from the results at batch 1 (measured in this one run)."""
    def time_of(name, length, batch=1):
        for row in run["results"]:
            result = row["backends"].get(name, {})
            if row["batch"] == batch and row["length"] == length and "median_s" in result:
                return result
        return None

    checks = []
    mra_ort, mra_torch = time_of("mra onnxruntime", TARGET_LENGTH), time_of("mra pytorch", TARGET_LENGTH)
    dense_ort = time_of("dense onnxruntime", TARGET_LENGTH)
    if mra_ort and mra_torch:
        ratio = mra_torch["median_s"] / mra_ort["median_s"]
        checks.append({"met": None, "value": ratio, "text": f"at {TARGET_LENGTH} tokens, "
                       f"batch 1, onnxruntime MRA is {ratio:.2f}x faster than the patched PyTorch "
                       f"model (the {SPEEDUP_OVER_PYTORCH:g}x target is retired: it depends on the "
                       "CPU's matrix products, tools/speed_ceiling.py)"})
    if mra_ort and dense_ort:
        ratio = mra_ort["median_s"] / dense_ort["median_s"]
        checks.append({"met": ratio <= 0.6, "value": ratio, "text": f"at {TARGET_LENGTH} tokens, "
                       f"batch 1, onnxruntime MRA takes {ratio:.2f}x the time of onnxruntime "
                       "dense (target <= 0.6x)"})
    for name in ("mra onnxruntime", "mra pytorch"):
        short, long = time_of(name, GROWTH_FROM), time_of(name, TARGET_LENGTH)
        if short and long:
            growth = long["median_s"] / short["median_s"]
            checks.append({"met": growth <= 10, "value": growth, "text": f"{name} time grows "
                           f"{growth:.1f}x from {GROWTH_FROM} to {TARGET_LENGTH} tokens "
                           "(target <= 10x; dense attention grows quadratically)"})
    for runtime in ("onnxruntime", "pytorch"):
        mra, dense = time_of(f"mra {runtime}", TARGET_LENGTH), time_of(f"dense {runtime}", TARGET_LENGTH)
        if mra and dense:
            judged = runtime in MEMORY_JUDGED_ON
            checks.append({"met": mra["peak_memory_mb"] < dense["peak_memory_mb"] if judged else None,
                           "value": mra["peak_memory_mb"] / max(dense["peak_memory_mb"], 1e-9),
                           "text": f"peak memory at {TARGET_LENGTH} tokens, {runtime}: MRA "
                           f"{mra['peak_memory_mb']:.0f} MB vs dense {dense['peak_memory_mb']:.0f} "
                           + ("MB (target: below dense)" if judged else
                              "MB (reported; memory is judged on onnxruntime)")})
    checks += _int8_targets(time_of("mra onnxruntime", TARGET_LENGTH),
                            time_of("mra onnxruntime int8", TARGET_LENGTH))
    return checks + _gpu_targets(time_of, run.get("layers"))


def _gpu_targets(time_of, layers) -> list[dict]:
    """Issue 25's, where the GPU columns ran: at TARGET_LENGTH, batch 1 and 8, each precision."""
    checks = []
    for batch in (1, 8):
        for tag in ("", " fp16"):
            mra = time_of(f"mra onnxruntime-cuda{tag}", TARGET_LENGTH, batch)
            dense = time_of(f"dense onnxruntime-cuda{tag}", TARGET_LENGTH, batch)
            if mra and dense:
                share = mra["median_s"] / dense["median_s"]
                checks.append({"met": share <= ORT_CUDA_SHARE, "value": share, "text": (
                    f"at {TARGET_LENGTH} tokens, batch {batch}, onnxruntime-cuda{tag}: MRA's "
                    f"portable graph takes {share:.2f}x dense's time (target <= {ORT_CUDA_SHARE:g}x)")})
        fused = time_of("mra pytorch-cuda fp16 (fused op)", TARGET_LENGTH, batch)
        dense = time_of("dense pytorch-cuda fp16", TARGET_LENGTH, batch)
        if fused and dense:
            share = fused["median_s"] / dense["median_s"]
            whole = layers == 12  # the target is mra-base's 12 layers; fewer are reported only
            checks.append({"met": share <= 1.0 if whole else None, "value": share, "text": (
                f"at {TARGET_LENGTH} tokens, batch {batch}, pytorch-cuda fp16: MRA with the fused "
                f"op takes {share:.2f}x RoBERTa SDPA's time ("
                + ("target <= 1x" if whole else "judged with --layers 12, the whole mra-base") + ")")})
    return checks


def _int8_targets(fp32, int8) -> list[dict]:
    """Issue 28's: int8 against fp32 onnxruntime MRA, batch 1 at TARGET_LENGTH, one run."""
    if not (fp32 and int8):
        return []
    speedup = fp32["median_s"] / int8["median_s"]
    return [{"met": speedup >= INT8_SPEEDUP, "value": speedup, "text": f"at {TARGET_LENGTH} "
             f"tokens, batch 1, int8 onnxruntime MRA is {speedup:.2f}x faster than fp32 "
             f"onnxruntime MRA (target >= {INT8_SPEEDUP:g}x)"},
            {"met": int8["peak_memory_mb"] <= fp32["peak_memory_mb"],
             "value": int8["peak_memory_mb"] / max(fp32["peak_memory_mb"], 1e-9),
             "text": f"peak memory at {TARGET_LENGTH} tokens, onnxruntime MRA: int8 "
             f"{int8['peak_memory_mb']:.0f} MB vs fp32 {fp32['peak_memory_mb']:.0f} MB (target: "
             "not above fp32)"}]


def plots(run: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label, name in (("median_s", "latency (ms)", "latency.png"),
                             ("peak_memory_mb", "peak working memory (MB)", "memory.png")):
        batches = sorted({row["batch"] for row in run["results"]})
        figure, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
        for axis, batch in zip(axes[0], batches):
            for backend in (b for b in run["backends"] if not b.get("skipped")):
                points = [(row["length"], row["backends"][backend["name"]][key])
                          for row in run["results"] if row["batch"] == batch
                          and key in row["backends"].get(backend["name"], {})]
                if points:
                    xs, ys = zip(*points)
                    ys = [y * 1e3 for y in ys] if key == "median_s" else ys
                    axis.plot(xs, ys, marker="o", linestyle="-" if backend["model"] == "mra" else "--",
                              label=backend["name"])
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("tokens")
            axis.set_ylabel(label)
            axis.set_title(f"batch {batch}, {run['model_short']}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = folder / name
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110)
        plt.close(figure)
        atomic_write_bytes(path, png.getvalue())
        written.append(path)
    return written


def save(run: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / JSON_NAME, json.dumps(run, indent=2))
    atomic_write_text(folder / "bench.md", markdown(run))
    return [folder / JSON_NAME, folder / "bench.md", *plots(run, folder)]
