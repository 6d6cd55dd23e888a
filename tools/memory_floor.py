#!/usr/bin/env python3
"""How low the patched PyTorch model's peak memory could go: the bench's layer with a free attention.

    python tools/memory_floor.py [--length 4096] [--batch 1] [--runs 4]

Measures, each in a fresh process (so that no allocator state carries over from another model),
the bench's dense model, the patched MRA model, and the MRA model whose attention is free: it
returns an output-sized tensor of zeros, the least any attention must allocate. No attention
implementation can take the MRA model below that third line, which is what bounds issue 6's
"peak memory below dense" target in PyTorch. Each run also gives the peak up to the start of the
feed-forward layer, which both models share: where the whole peak is higher, the feed-forward
layer sets it. Memory is measured as ``mra-export bench`` measures it (peak resident set above the
level before the forward pass); the bench reports the first run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mra_export import patching  # noqa: E402
from mra_export.bench import models  # noqa: E402
from mra_export.bench.cli import int_within  # noqa: E402
from mra_export.bench.measure import PeakMemory  # noqa: E402

VARIANTS = ("dense", "mra", "mra, free attention")


def free_attention(query, key, value, attention_mask, **settings):
    return torch.zeros_like(query)


def peaks(variant: str, length: int, batch: int, runs: int) -> list[tuple[float, float]]:
    """For each of ``runs`` forward passes, the first one included: its peak MB above the level
    before it, and the peak up to the start of the feed-forward layer."""
    mra, dense = models.build_models(layers=1)
    model = dense if variant == "dense" else mra
    ids, mask = models.inputs(batch, length)
    memory = before_feed_forward = None

    def feed_forward_starts(module, args):
        nonlocal before_feed_forward
        before_feed_forward = memory.peak

    freed = (mock.patch.object(patching, "mra_attention", free_attention)
             if variant == "mra, free attention" else contextlib.nullcontext())
    hook = model.encoder.layer[0].intermediate.register_forward_pre_hook(feed_forward_starts)
    found = []
    with freed, torch.no_grad():
        try:
            for _ in range(runs):
                with PeakMemory(interval=0.0003) as memory:  # steps last milliseconds
                    model(input_ids=ids, attention_mask=mask)
                found.append((memory.peak / 2**20, before_feed_forward / 2**20))
        finally:
            hook.remove()
    return found


def in_fresh_process(variant: str, args) -> list[tuple[float, float]]:
    command = [sys.executable, __file__, "--variant", variant, "--length", str(args.length),
               "--batch", str(args.batch), "--runs", str(args.runs)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"memory_floor.py: measuring {variant!r} failed: "
                 f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int_within(1, models.MAX_LENGTH), default=models.MAX_LENGTH)
    parser.add_argument("--batch", type=int_within(1), default=1)
    parser.add_argument("--runs", type=int_within(1), default=4)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(peaks(args.variant, args.length, args.batch, args.runs)))
        return

    print(f"one layer, batch {args.batch}, {args.length} tokens, a process per model; per run "
          "(the first is what the bench reports): peak MB above the level before it, and in "
          "brackets the peak before the feed-forward layer")
    found = {variant: in_fresh_process(variant, args) for variant in VARIANTS}
    for variant, values in found.items():
        print(f"  {variant:<20} " + "  ".join(f"{whole:7.1f} ({before:5.1f})"
                                              for whole, before in values))
    floor, dense = found["mra, free attention"][0][0], found["dense"][0][0]
    print(f"first run: the MRA model with a free attention peaks at {floor:.1f} MB, "
          f"{floor / dense:.2f}x the dense model's {dense:.1f} MB")


if __name__ == "__main__":
    main()
