#!/usr/bin/env python3
"""What a change moved: MRA at batch 1, 4096 tokens (one mra-base layer) measured for each commit.

    python tools/compare_commits.py 71d855a 436be02 HEAD [--worktree]

For each commit, in a fresh process that imports that commit's mra_export (a temporary git
worktree): the patched PyTorch model and onnxruntime on that commit's portable export, each the
median of 15 runs after a warm-up, and each one's peak memory (mra_export/bench/measure.py of the
current tree, so every commit is measured the same way). ``--worktree`` adds the uncommitted tree.
Commits from 0f46e79 on (the first with the exporter) can be measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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


def measure_in_child(tree: Path) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(tree))
    result = subprocess.run([sys.executable, __file__, "--measure"], cwd=tree, env=environment,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"compare_commits: measuring {tree} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="*")
    parser.add_argument("--worktree", action="store_true", help="also the uncommitted tree")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_this_tree()))
        return 0
    for commit in args.commits:  # before any measuring, which takes a minute per tree
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                f"{commit}^{{commit}}"], capture_output=True, check=False)
        if found.returncode != 0:
            parser.error(f"{commit!r} is not a commit of {ROOT}")
    print(f"batch 1, {LENGTH} tokens, 1 mra-base layer; medians of 15 runs; peak memory (MB)")
    print(f"{'tree':>10} {'pytorch ms':>11} {'pytorch MB':>11} {'ort ms':>8} {'ort MB':>8}")
    trees = [(commit, None) for commit in args.commits] + ([("worktree", ROOT)] if args.worktree
                                                           else [])
    with tempfile.TemporaryDirectory() as scratch:
        for name, tree in trees:
            if tree is None:
                tree = Path(scratch) / name
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                                name], check=True, capture_output=True)
            try:
                row = measure_in_child(tree)
            finally:
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False, capture_output=True)
            print(f"{name:>10} {row['pytorch_ms']:>11.0f} {row['pytorch_mb']:>11.0f} "
                  f"{row['onnxruntime_ms']:>8.0f} {row['onnxruntime_mb']:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
