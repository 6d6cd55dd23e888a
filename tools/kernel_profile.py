#!/usr/bin/env python3
"""The CUDA kernels' distance to the GPU's limits (issue 25): run under Nsight Compute.

    ncu --section SpeedOfLight --section Occupancy --csv --page details \\
        python tools/kernel_profile.py > ncu.csv              # on the GPU machine
    python tools/kernel_profile.py --report ncu.csv [--gpu "NVIDIA H100 PCIe"]  # anywhere: the table

The first form calls the fused op twice per case (fp16, 12 heads, head_dim 64, 8 blocks per row,
4096 tokens, batch 1 and 8): a warm-up, then the call the table reads (the cases run in order and
launch the same kernels, so each kernel's launches split evenly between them). The second reads
ncu's CSV: each kernel's duration,
DRAM throughput as a fraction of peak (ncu's own), and for ``highResolution`` the tensor FLOP rate
(its multiply-adds counted here: 2 products of 32x64 by 64x32 per selected block and query block)
against the dense fp16 peak of the GPU ``--gpu`` names (``nvidia-smi``'s name; an H200 where it
is not given): 989 TFLOP/s on an H100 or H200 SXM, 835 on their NVL cards, 756 on an H100 PCIe;
then, from the Occupancy section, each kernel's CTAs an SM with what bounds them (as
tools/occupancy.py computes them without a GPU) and its achieved occupancy.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADS, HEAD_DIM, BLOCKS_PER_ROW, LENGTH = 12, 64, 8, 4096
BATCHES = (1, 8)
# Dense fp16/bf16 tensor-core peaks (NVIDIA's datasheets: half their "with sparsity" figures), by
# the words nvidia-smi's name holds; the first row whose words it all holds counts.
FP16_DENSE_PEAK_TFLOPS = ((("H100", "NVL"), 835.0), (("H200", "NVL"), 835.0), (("H100", "PCIe"), 756.0),
                          (("H100",), 989.0), (("H200",), 989.0))
DEFAULT_GPU = "NVIDIA H200"
# Nsight Compute's Occupancy section: each resource's limit on CTAs an SM, as tools/occupancy.py names it.
OCCUPANCY_LIMITS = {"SM": "CTAs an SM", "Registers": "registers", "Shared Mem": "shared memory", "Warps": "warps"}


def fp16_peak_tflops(gpu: str) -> float | None:
    """The dense fp16 tensor peak of the GPU named ``gpu``, or None for one not in the table."""
    return next((peak for words, peak in FP16_DENSE_PEAK_TFLOPS if all(w in gpu for w in words)), None)


def run_cases() -> None:
    import torch

    from mra_export.fused import mra_attention_op

    for batch in BATCHES:
        q, k, v = (torch.randn(batch, HEADS, LENGTH, HEAD_DIM, device="cuda", dtype=torch.float16)
                   for _ in range(3))
        mask = torch.ones(batch, LENGTH, device="cuda", dtype=torch.int32)
        for _ in range(2):  # a warm-up, then the call the table reads
            mra_attention_op(q, k, v, mask, BLOCKS_PER_ROW * LENGTH // 32, "full", 32, 0, 0)
        torch.cuda.synchronize()


def high_resolution_flops(batch: int) -> float:
    selected = batch * HEADS * BLOCKS_PER_ROW * (LENGTH // 32)  # blocks of 32 queries x 32 keys
    return selected * 2 * (2 * 32 * 32 * HEAD_DIM)  # Q.K^T and P.V, 2 flops a multiply-add


def ctas_an_sm(metrics: dict) -> str:
    """The Occupancy section's CTAs an SM and the limits that set it ("7 (shared memory)"): to
    set beside tools/occupancy.py's, computed without a GPU (tools/results/occupancy.md)."""
    limits = {name: float(metrics[f"Block Limit {key}"][1]) for key, name in OCCUPANCY_LIMITS.items()
              if f"Block Limit {key}" in metrics}
    if not limits:
        return "-"
    ctas = min(limits.values())
    return f"{ctas:.0f} ({', '.join(name for name, value in limits.items() if value == ctas)})"


def report(path: Path, gpu: str = DEFAULT_GPU) -> str:
    peak = fp16_peak_tflops(gpu)
    rows = list(csv.DictReader(line for line in path.read_text().splitlines()
                               if line.startswith('"')))
    launches = defaultdict(list)  # kernel -> [(duration ns, dram %)] in launch order
    for row in rows:
        name = row["Kernel Name"].split("(")[0].split("<")[0].split("::")[-1]
        metric, value = row["Metric Name"], row["Metric Value"].replace(",", "")
        launch = row["ID"]
        launches[name].append((launch, metric, row["Metric Unit"], value))
    lines = ["| batch | kernel | time us | DRAM % of peak | SM % of peak | tensor TFLOP/s | % of fp16 peak "
             "| CTAs an SM (bound by) | achieved occupancy % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entries in launches.items():
        by_launch = defaultdict(dict)
        for launch, metric, unit, value in entries:
            by_launch[launch][metric] = (unit, value)
        ordered = [by_launch[k] for k in sorted(by_launch, key=int)]
        per_case = len(ordered) // len(BATCHES)
        if per_case == 0 or not name.startswith(("blockMeans", "lowResolution",
                                                 "selectBlocks", "highResolution")):
            continue
        for index, batch in enumerate(BATCHES):
            metrics = ordered[(index + 1) * per_case - 1]  # the case's last launch
            unit, duration = metrics.get("Duration", ("ns", "nan"))
            seconds = float(duration) * {"ns": 1e-9, "us": 1e-6, "usecond": 1e-6, "nsecond": 1e-9,
                                         "ms": 1e-3, "msecond": 1e-3}.get(unit, 1e-9)
            dram = metrics.get("DRAM Throughput", ("%", "nan"))[1]
            sm = metrics.get("Compute (SM) Throughput", ("%", "nan"))[1]
            rate = fraction = "-"
            if name.startswith("highResolution"):
                tflops = high_resolution_flops(batch) / seconds / 1e12
                rate = f"{tflops:.0f}"
                fraction = f"{100 * tflops / peak:.1f}" if peak else "-"
            achieved = metrics.get("Achieved Occupancy", ("%", "-"))[1]
            lines.append(f"| {batch} | {name} | {seconds * 1e6:.1f} | {dram} | {sm} | {rate} | {fraction} "
                         f"| {ctas_an_sm(metrics)} | {achieved} |")
    known = f"its dense fp16 peak {peak:.0f} TFLOP/s" if peak else "no fp16 peak known for it"
    return f"{gpu}: {known}\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="ncu's CSV: print the table instead of running")
    parser.add_argument("--gpu", default=DEFAULT_GPU,
                        help=f"with --report: the GPU's name, as nvidia-smi gives it (default {DEFAULT_GPU!r})")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.gpu), end="")
    else:
        run_cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
