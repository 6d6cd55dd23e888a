#!/usr/bin/env python3
"""Where the patched PyTorch model's memory goes, step by step through ``mra_attention``.

    python tools/memory_trace.py [--length 4096] [--batch 1]

Builds the bench's model (one mra-base layer, 8 blocks per row at 4096 positions), runs it once to
warm up, then once more while a thread samples the process's resident set (as ``mra-export
bench`` measures memory), and prints for each step of the attention the resident memory at its
start, its peak and its end, above the level before the forward pass. Profile with it before
changing the eager path; docs/performance.md quotes one run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mra_export import attention, patching  # noqa: E402
from mra_export.bench import models  # noqa: E402
from mra_export.bench.cli import int_within  # noqa: E402
from mra_export.bench.measure import PeakMemory, resident_bytes  # noqa: E402

STEPS = ("_to_padded_rows", "_low_resolution", "_selection", "_high_resolution",
         "_selected_logits", "_quantised_row_max", "_sum_per_query_block", "_combine_full")
SAMPLE_INTERVAL = 0.0005  # seconds: the steps last milliseconds


class StepTracer:
    """Wraps functions so that each call prints its start, peak and end memory (MB above the
    level where ``memory`` was entered), indented by how deeply the calls nest."""

    def __init__(self, memory: PeakMemory):
        self.memory, self.depth = memory, 0

    def wrap(self, function, name: str):
        @functools.wraps(function)
        def run(*args, **kwargs):
            outer_peak = self.memory.peak
            start = self.memory.restart()
            self.depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                end = resident_bytes() - self.memory.base
                own_peak = max(self.memory.peak, end)
                self.memory.peak = max(outer_peak, own_peak)  # the caller's peak includes ours
                start_mb, peak_mb, end_mb = (value / 2**20 for value in (start, own_peak, end))
                print(f"{'  ' * self.depth}{name:<{30 - 2 * self.depth}} start {start_mb:7.1f}   "
                      f"peak {peak_mb:7.1f}   end {end_mb:7.1f} MB")
        return run


@contextlib.contextmanager
def steps_traced(memory: PeakMemory):
    """Trace ``mra_attention`` and its steps (module attributes, looked up at each call)."""
    tracer = StepTracer(memory)
    originals = {name: getattr(attention, name) for name in STEPS}
    original_entry = patching.mra_attention
    try:
        for name, function in originals.items():
            setattr(attention, name, tracer.wrap(function, name))
        patching.mra_attention = tracer.wrap(original_entry, "mra_attention")
        yield
    finally:
        for name, function in originals.items():
            setattr(attention, name, function)
        patching.mra_attention = original_entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int_within(1, models.MAX_LENGTH), default=models.MAX_LENGTH)
    parser.add_argument("--batch", type=int_within(1), default=1)
    args = parser.parse_args(argv)

    mra, _ = models.build_models(layers=1)
    ids, mask = models.inputs(args.batch, args.length)
    with torch.no_grad():
        mra(input_ids=ids, attention_mask=mask)  # warm-up

    with PeakMemory(interval=SAMPLE_INTERVAL) as memory, steps_traced(memory):
        with torch.no_grad():
            mra(input_ids=ids, attention_mask=mask)
    whole = memory.peak / 2**20
    print(f"one layer, batch {args.batch}, {args.length} tokens: peak {whole:.1f} MB above the "
          "level before the forward pass (steps print when they end; nested ones first)")


if __name__ == "__main__":
    main()
