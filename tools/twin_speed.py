#!/usr/bin/env python3
"""The C++ twin's time on this CPU: mra-base attention at 4096 tokens (12 heads, head_dim 64, 8
blocks per row, batch 1), through its C interface, best of 3 calls after a warm-up.

    python tools/twin_speed.py [--build plugins/build] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="plugins/build", help="folder of libmra_attention_cpu.so")
    parser.add_argument("--threads", type=int, default=0, help="mraSetCpuThreads (0: every core)")
    args = parser.parse_args(argv)
    os.environ["MRA_EXPORT_PLUGIN_BUILD"] = args.build
    from mra_export import native

    library = native.MraLibrary(native.library_path(native.CPU_LIBRARY))
    threaded = hasattr(library.lib, "mraSetCpuThreads")  # before 2026-12-04: one thread
    if threaded:
        library.set_cpu_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 12, 4096, 64, generator=generator) for _ in range(3))
    mask = torch.ones(1, 4096)
    settings = dict(num_blocks=8 * 128, approx_mode="full")
    library.attention(query, key, value, mask, **settings)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        library.attention(query, key, value, mask, **settings)
        times.append(time.perf_counter() - start)
    threads = (args.threads or "all") if threaded else "1, the only"
    print(f"{args.build}: {min(times) * 1e3:.1f} ms ({threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
