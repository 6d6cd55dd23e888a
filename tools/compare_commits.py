#!/usr/bin/env python3
"""What a change moved: MRA at batch 1, 4096 tokens (one mra-base layer) measured for each commit.

    python tools/compare_commits.py 71d855a 436be02 HEAD [--worktree] [--host] [--rounds N]

For each commit, in a fresh process that imports that commit's mra_export (a temporary git
worktree): the patched PyTorch model and onnxruntime on that commit's portable export, each the
median of 15 runs after a warm-up, and each one's peak memory (mra_export/bench/measure.py of the
current tree, so every commit is measured the same way). ``--worktree`` adds the uncommitted tree.
Commits from 0f46e79 on (the first with the exporter) can be measured.

``--host``: what Python costs around the kernels instead, the part of a GPU forward that the
device does not hide at batch 1. A 12-layer model of head dim 32 and 64 tokens patched as users
patch it (``attention="auto"``, which picks the op) and as ``tools/gpu_speed.py`` does
(``"fused"``), the op's library call replaced by one that returns at once, against RoBERTa of the
same shape with SDPA, one thread, ``torch.inference_mode``; and one call of the op so. Each a
median of 9 timings (of 100 forwards, of 3000 op calls). ``--rounds`` alternates the trees that
many times. Commits from 1e83435 on (the fused op) can be measured; the libraries are this
tree's ``plugins/build`` unless ``MRA_EXPORT_PLUGIN_BUILD`` says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTH = 4096


def measure_this_tree() -> dict:
    """Runs in the child process, with the commit's tree first on sys.path. The model is spelled
    out here rather than taken from ``mra_export.bench.models``, which older commits lack (same
    model shapes and seed; the input ids differ)."""
    import onnx_ir as ir
    import onnxruntime as ort
    import torch
    from transformers import MraConfig, MraModel

    from mra_export.export.exporter import _trace
    from mra_export.patching import patch_model
    from mra_export.runtime.ort import default_options
    from mra_export.tasks import TASKS

    spec = importlib.util.spec_from_file_location("measure", ROOT / "mra_export/bench/measure.py")
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)

    torch.manual_seed(0)
    config = MraConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                       vocab_size=50265, type_vocab_size=1, num_hidden_layers=1,
                       max_position_embeddings=LENGTH, block_per_row=8, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = patch_model(MraModel(config).eval())
    ids = torch.randint(5, config.vocab_size, (1, LENGTH),
                        generator=torch.Generator().manual_seed(LENGTH))
    mask = torch.ones(1, LENGTH, dtype=torch.int64)
    with torch.no_grad():
        eager = measure.measure(lambda: model(input_ids=ids, attention_mask=mask), 15, 15)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        ir.save(_trace(model, TASKS["feature-extraction"], "portable", 20), path)
        session = ort.InferenceSession(str(path), default_options(),
                                       providers=["CPUExecutionProvider"])
        feed = {i.name: (ids if "ids" in i.name else mask).numpy() for i in session.get_inputs()}
        runtime = measure.measure(lambda: session.run(None, feed), 15, 15)
    return {"pytorch_ms": eager["median_s"] * 1e3, "pytorch_mb": eager["peak_memory_mb"],
            "onnxruntime_ms": runtime["median_s"] * 1e3, "onnxruntime_mb": runtime["peak_memory_mb"]}


def median_us(run, calls: int) -> float:
    """Median over 9 timings of ``calls`` runs, per run, after a warm-up."""
    for _ in range(calls // 5):
        run()
    timings = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        timings.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(timings)


def measure_host_cost() -> dict:
    """Runs in the child process (``--host``): microseconds of Python around the kernels."""
    import ctypes

    import torch
    from transformers import MraConfig, MraModel, RobertaConfig, RobertaModel

    from mra_export import fused
    from mra_export.patching import patch_model

    torch.set_num_threads(1)
    length = 64
    shape = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=100,
                 num_hidden_layers=12, max_position_embeddings=length + 2)
    torch.manual_seed(0)
    mra = MraModel(MraConfig(**shape, block_per_row=2)).eval()
    roberta = RobertaModel(RobertaConfig(**shape, attn_implementation="sdpa"),
                           add_pooling_layer=False).eval()
    library = fused.kernel_library("cpu")
    returns_at_once = ctypes.CFUNCTYPE(ctypes.c_int)(lambda *args: 0)
    library.lib = _With(library.lib, mraAttentionCpu=returns_at_once)
    ids = torch.randint(5, 100, (1, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, length, dtype=torch.int64)
    q, k, v = (torch.randn(1, length, 64).view(1, length, 2, 32).transpose(1, 2) for _ in range(3))
    op_mask = torch.ones(1, length, dtype=torch.int32)
    with torch.inference_mode():
        times = {}
        for attention in ("auto", "fused"):
            patch_model(mra, attention=attention)
            times[f"mra_{attention}_us"] = median_us(lambda: mra(input_ids=ids, attention_mask=mask),
                                                     100)
        return {**times,
                "roberta_us": median_us(lambda: roberta(input_ids=ids, attention_mask=mask), 100),
                "op_us": median_us(lambda: fused.fused_mra_attention(q, k, v, op_mask,
                                                                    num_blocks=4), 3000)}


class _With:
    """A library whose named functions are replaced, the others its own."""

    def __init__(self, library, **replaced):
        self._library, self._replaced = library, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._library, name)


def measure_in_child(tree: Path, host: bool) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(tree))
    if host:  # the op's library; a worktree has none built
        environment.setdefault("MRA_EXPORT_PLUGIN_BUILD", str(ROOT / "plugins" / "build"))
    command = [sys.executable, __file__, "--measure"] + (["--host"] if host else [])
    result = subprocess.run(command, cwd=tree, env=environment,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"compare_commits: measuring {tree} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="*")
    parser.add_argument("--worktree", action="store_true", help="also the uncommitted tree")
    parser.add_argument("--host", action="store_true",
                        help="Python's cost around the kernels instead (a small model, one thread)")
    parser.add_argument("--rounds", type=int, default=1, help="times each tree is measured, "
                        "alternating (default 1)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:  # not bench.cli's int_within: the tool imports no mra_export of its own
        parser.error(f"argument --rounds: must be at least 1, got {args.rounds}")
    if args.measure:
        print(json.dumps(measure_host_cost() if args.host else measure_this_tree()))
        return 0
    for commit in args.commits:  # before any measuring, which takes a minute per tree
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                f"{commit}^{{commit}}"], capture_output=True, check=False)
        if found.returncode != 0:
            parser.error(f"{commit!r} is not a commit of {ROOT}")
    print(HOST_HEADER if args.host else HEADER)
    names = list(args.commits) + (["worktree"] if args.worktree else [])
    with tempfile.TemporaryDirectory() as scratch:
        trees = {name: ROOT if name == "worktree" else Path(scratch) / name for name in names}
        try:
            for name, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                                    str(tree), name], check=True, capture_output=True)
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    row = measure_in_child(tree, args.host)
                    print((_host_line if args.host else _line)(name, row), flush=True)
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False, capture_output=True)
    return 0


HEADER = (f"batch 1, {LENGTH} tokens, 1 mra-base layer; medians of 15 runs; peak memory (MB)\n"
          f"{'tree':>10} {'pytorch ms':>11} {'pytorch MB':>11} {'ort ms':>8} {'ort MB':>8}")
HOST_HEADER = ("Python around the kernels (the op's library call returns at once), 12 layers, "
               "64 tokens, one thread (µs)\n"
               f"{'tree':>10} {'MRA auto':>9} {'MRA fused':>10} {'RoBERTa SDPA':>13} "
               f"{'auto / RoBERTa':>15} {'fused / RoBERTa':>16} {'one op call':>12}")


def _line(name: str, row: dict) -> str:
    return (f"{name:>10} {row['pytorch_ms']:>11.0f} {row['pytorch_mb']:>11.0f} "
            f"{row['onnxruntime_ms']:>8.0f} {row['onnxruntime_mb']:>8.0f}")


def _host_line(name: str, row: dict) -> str:
    roberta = row["roberta_us"]
    return (f"{name:>10} {row['mra_auto_us']:>9.0f} {row['mra_fused_us']:>10.0f} {roberta:>13.0f} "
            f"{row['mra_auto_us'] / roberta:>14.2f}x {row['mra_fused_us'] / roberta:>15.2f}x "
            f"{row['op_us']:>12.1f}")


if __name__ == "__main__":
    sys.exit(main())
