#!/usr/bin/env python3
"""Where one bench layer's time goes, per operator, in PyTorch and in onnxruntime.

    python tools/profile_layer.py [--length 4096] [--batch 1] [--runs 5]

Builds the bench's MRA model (one mra-base layer, 8 blocks per row at 4096 positions), exports it
the way ``mra-export bench`` does, and profiles the same input with ``torch.profiler`` (eager,
no gradients) and with onnxruntime's own profiler (``SessionOptions.enable_profiling``). Prints
milliseconds per run for the heaviest operators of each. Profile with it before changing the
attention; docs/performance.md quotes one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mra_export.bench import models  # noqa: E402
from mra_export.bench.cli import int_within  # noqa: E402
from mra_export.runtime.ort import CPU, default_options  # noqa: E402

TOP = 12


def profile_pytorch(model, ids, mask, runs: int) -> tuple[float, list[tuple[str, float]]]:
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(runs):
                model(input_ids=ids, attention_mask=mask)
        wall = (time.perf_counter() - start) / runs
    per_op = [(event.key, event.self_cpu_time_total / 1000 / runs)
              for event in profiler.key_averages()]
    return wall, sorted(per_op, key=lambda item: -item[1])


def profile_onnxruntime(path: Path, ids, mask, runs: int, folder: Path):
    options = default_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort")
    session = ort.InferenceSession(str(path), options, providers=[CPU])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    session.run(None, feed)  # warm-up: profiled too (onnxruntime cannot start later), left out
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    wall = (time.perf_counter() - start) / runs
    with open(session.end_profiling()) as trace:
        events = json.load(trace)
    per_op, per_node, seen = collections.Counter(), collections.Counter(), set()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][:-len("_kernel_time")]
            if node not in seen:  # each node's first event is the warm-up's, whose first
                seen.add(node)    # touches of new memory cost up to 20x a steady run's
                continue
            per_op[event["args"]["op_name"]] += event["dur"]
            per_node[f"{node} ({event['args']['op_name']})"] += event["dur"]
    scale = 1000 * runs  # microseconds over the timed runs -> ms per run
    return (wall, [(name, us / scale) for name, us in per_op.most_common()],
            [(name, us / scale) for name, us in per_node.most_common()])


def print_table(title: str, rows) -> None:
    print(f"\n{title}")
    for name, ms in rows[:TOP]:
        print(f"  {name:<58} {ms:9.2f} ms")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int_within(1, models.MAX_LENGTH), default=models.MAX_LENGTH)
    parser.add_argument("--batch", type=int_within(1), default=1)
    parser.add_argument("--runs", type=int_within(1), default=5)
    args = parser.parse_args(argv)

    mra, _ = models.build_models(layers=1)
    ids, mask = models.inputs(args.batch, args.length)
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = models.export(mra, Path(folder) / "mra.onnx")
        ort_wall, ort_ops, ort_nodes = profile_onnxruntime(onnx_path, ids, mask, args.runs,
                                                           Path(folder))
    torch_wall, torch_ops = profile_pytorch(mra, ids, mask, args.runs)

    print(f"one MRA layer, batch {args.batch}, {args.length} tokens, {args.runs} runs; torch "
          f"threads {torch.get_num_threads()}")
    print_table(f"PyTorch (eager): {torch_wall * 1000:.0f} ms per run under the profiler; "
                "self time per operator", torch_ops)
    print_table(f"onnxruntime: {ort_wall * 1000:.0f} ms per run under the profiler; kernel time "
                "per operator type", ort_ops)
    print_table("onnxruntime: heaviest nodes", ort_nodes)


if __name__ == "__main__":
    main()
