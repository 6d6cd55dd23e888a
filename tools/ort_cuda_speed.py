#!/usr/bin/env python3
"""onnxruntime's CUDA provider: MRA's portable graph against the plugin graph whose MraAttention
nodes run in libmra_attention_ort.so's CUDA kernel, and RoBERTa's (dense) graph (issue 24).

    python tools/ort_cuda_speed.py export DIR [--dtypes fp16,fp32] [--dense]   # here
    python tools/ort_cuda_speed.py run DIR [--out OUT]   # on a GPU with onnxruntime-gpu

One encoder layer of mra-base shapes (hidden 768, 12 heads, intermediate 3072, 8 blocks per row
at 4096 positions; a 1000-token vocabulary so that the graphs travel light: the embedding
lookup's cost does not depend on it), exported as the bench exports it. ``run`` times each graph
at 4096 tokens, batch 1 and 8 (medians of session.run with the inputs on the host, the outputs
copied back: the same for every graph), checks the op graph against the portable one, and counts
the Memcpy nodes the CUDA provider inserted (nodes it placed on the CPU), from its optimized
graph. ``run`` times the graphs it finds in DIR (a graph of one layer is about 21 MB in fp16:
the position embeddings of 4096 positions weigh half of it, which matters for what a device
call may carry).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LENGTH, BATCHES = 4096, (1, 8)
GRAPHS = ("mra-portable", "mra-op", "dense")


def export(folder: Path, dtypes: list[str], with_dense: bool) -> None:
    import onnx_ir as ir
    import torch

    from mra_export.bench import models
    from mra_export.export.exporter import _trace
    from mra_export.tasks import TASKS

    models.SHAPES["vocab_size"] = 1000
    mra, dense = models.build_models(layers=1)
    folder.mkdir(parents=True, exist_ok=True)
    graphs = [("mra-portable", mra, "portable"), ("mra-op", mra, "plugin")]
    graphs += [("dense", dense, "portable")] if with_dense else []
    for dtype in dtypes:
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        for name, model, flavour in graphs:
            path = folder / f"{name}-{dtype}.onnx"
            ir.save(_trace(model.to(torch_dtype), TASKS["feature-extraction"], flavour, 20), path)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)", flush=True)


def session(path: Path, optimized: Path):
    import onnxruntime as ort

    from mra_export.runtime.ort import CUDA_FP32, default_options, register_op_library

    options = default_options()
    options.optimized_model_filepath = str(optimized)
    if path.name.startswith("mra-op"):
        register_op_library(options)
    return ort.InferenceSession(str(path), options, providers=[CUDA_FP32])


def memcpy_nodes(optimized: Path) -> int:
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    return sum(node.op_type.startswith("Memcpy") for node in graph.node)


def median_ms(run, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(folder: Path) -> dict:
    import tempfile

    import onnxruntime as ort

    ort.preload_dlls()
    rows = []
    optimized = Path(tempfile.mkdtemp())
    for dtype in ("fp16", "fp32"):
        names = [name for name in GRAPHS if (folder / f"{name}-{dtype}.onnx").is_file()]
        if not names:
            continue
        sessions = {name: session(folder / f"{name}-{dtype}.onnx", optimized / f"{name}.onnx")
                    for name in names}
        memcpy = {name: memcpy_nodes(optimized / f"{name}.onnx") for name in names}
        for batch in BATCHES:
            rng = np.random.default_rng(batch)
            feed = {"input_ids": rng.integers(5, 1000, (batch, LENGTH), dtype=np.int64),
                    "attention_mask": np.ones((batch, LENGTH), dtype=np.int64)}
            row = dict(dtype=dtype, batch=batch, length=LENGTH, memcpy_nodes=memcpy)
            outputs = {}
            for name, s in sessions.items():
                outputs[name] = s.run(None, feed)[0].astype(np.float32)
                row[f"{name}_ms"] = median_ms(lambda: s.run(None, feed))
            row["op_vs_portable_max_abs"] = float(np.abs(outputs["mra-op"] - outputs["mra-portable"]).max())
            row["portable_over_op"] = row["mra-portable_ms"] / row["mra-op_ms"]
            if "dense" in sessions:
                row["op_over_dense"] = row["mra-op_ms"] / row["dense_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return dict(onnxruntime=ort.__version__, rows=rows)


def markdown(result: dict) -> str:
    lines = [f"# onnxruntime {result['onnxruntime']} CUDA provider, 1 layer of mra-base, "
             f"{LENGTH} tokens (ms)", "",
             "| dtype | batch | MRA portable | MRA + op | dense | portable / op | op / dense | "
             "op vs portable max abs | Memcpy nodes (portable, op, dense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r["memcpy_nodes"]
        dense = f"{r['dense_ms']:.2f}" if "dense_ms" in r else "not run"
        versus = f"{r['op_over_dense']:.2f}x" if "op_over_dense" in r else "-"
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['mra-portable_ms']:.2f} | "
                     f"{r['mra-op_ms']:.2f} | {dense} | {r['portable_over_op']:.2f}x | {versus} | "
                     f"{r['op_vs_portable_max_abs']:.1e} | "
                     f"{', '.join(str(m.get(n, '-')) for n in GRAPHS)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "run"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--dtypes", default="fp16", help="export: fp16, fp32 or both (fp16,fp32)")
    parser.add_argument("--dense", action="store_true", help="export: RoBERTa's graph too")
    args = parser.parse_args(argv)
    if args.action == "export":
        export(args.folder, args.dtypes.split(","), args.dense)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.folder)
    (args.out / "ort_cuda_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "ort_cuda_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
