#!/usr/bin/env python3
"""Where the patched PyTorch model's memory goes, step by step through ``mra_attention``.

    python tools/memory_trace.py [--length 4096] [--batch 1]

Builds the bench's model (one mra-base layer, 8 blocks per row at 4096 positions), runs it once to
warm up, then once more while a thread samples the process's resident set (as ``mra-export
bench`` measures memory), and prints for each step of the attention the resident memory at its
start, its peak and its end, above the level before the forward pass. Profile with it before
changing the eager path; the README's Performance section quotes one run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mra_export import attention, patching  # noqa: E402
from mra_export.bench import models  # noqa: E402
from mra_export.bench.measure import release_freed_memory, resident_bytes  # noqa: E402

STEPS = ("_to_padded_rows", "_low_resolution", "_selection", "_high_resolution",
         "_selected_logits", "_quantised_row_max", "_sum_per_query_block", "_combine_full")


class Sampler:
    """The highest resident set seen since the last ``restart``, sampled every half millisecond."""

    def __init__(self):
        self.peak, self._stop = resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0005)

    def restart(self) -> int:
        self.peak = resident_bytes()
        return self.peak

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def traced(function, name: str, sampler: Sampler, base: list, depth: list):
    """``function``, printing its start, peak and end memory (MB above ``base[0]``)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        outer_peak = sampler.peak
        start = sampler.restart()
        depth[0] += 1
        try:
            return function(*args, **kwargs)
        finally:
            depth[0] -= 1
            end = resident_bytes()
            own_peak = max(sampler.peak, end)
            sampler.peak = max(outer_peak, own_peak)
            megabytes = [(value - base[0]) / 2**20 for value in (start, own_peak, end)]
            print(f"{'  ' * depth[0]}{name:<{30 - 2 * depth[0]}} start {megabytes[0]:7.1f}   "
                  f"peak {megabytes[1]:7.1f}   end {megabytes[2]:7.1f} MB")
    return run


@contextlib.contextmanager
def steps_traced(sampler: Sampler, base: list):
    """Trace ``mra_attention`` and its steps (module attributes, looked up at each call)."""
    depth = [0]
    originals = {name: getattr(attention, name) for name in STEPS}
    original_entry = patching.mra_attention
    try:
        for name, function in originals.items():
            setattr(attention, name, traced(function, name, sampler, base, depth))
        patching.mra_attention = traced(original_entry, "mra_attention", sampler, base, depth)
        yield
    finally:
        for name, function in originals.items():
            setattr(attention, name, function)
        patching.mra_attention = original_entry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=models.MAX_LENGTH)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)

    mra, _ = models.build_models(layers=1)
    ids, mask = models.inputs(args.batch, args.length)
    with torch.no_grad():
        mra(input_ids=ids, attention_mask=mask)  # warm-up

    base = [0]
    with Sampler() as sampler, steps_traced(sampler, base):
        release_freed_memory()
        base[0] = sampler.restart()
        with torch.no_grad():
            mra(input_ids=ids, attention_mask=mask)
        whole = (max(sampler.peak, resident_bytes()) - base[0]) / 2**20
    print(f"one layer, batch {args.batch}, {args.length} tokens: peak {whole:.1f} MB above the "
          "level before the forward pass (steps print when they end; nested ones first)")


if __name__ == "__main__":
    main()
