"""``mra-export bench``: every backend, every length and batch, in one process."""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
from pathlib import Path

import onnxruntime
import torch

from ..errors import UserError, first_line
from ..files import check_writable_folder, staged_folder
from ..machine import CPUINFO, cpuinfo_field
from . import models, report
from .measure import measure

DENSE_ON_CPU = ("dense onnxruntime", "dense onnxruntime int8")  # float32 scores either way


def run_bench_from_args(args) -> dict:
    lengths = _integers("--lengths", args.lengths, 1, models.MAX_LENGTH)
    batches = _integers("--batches", args.batches, 1)
    if args.layers < 1:
        raise UserError(f"--layers must be at least 1, got {args.layers}")
    if not 0 < args.budget < math.inf:
        raise UserError(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA GPU and there is none here; run --device cpu")
    check_writable_folder(args.out)  # now, not after minutes of timing
    return run_bench(Path(args.out), lengths, batches, args.layers, args.budget,
                     command=" ".join(["mra-export", *sys.argv[1:]]), device=args.device)


def _integers(flag: str, text: str, low: int, high: float = math.inf) -> list[int]:
    """``256,512`` -> [256, 512], each within low..high, or a one-line error naming the flag;
    a value given twice is measured once."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not all(low <= value <= high for value in values):
        raise UserError(f"{flag} must be {_bound(low, high)}, got {text}")
    return list(dict.fromkeys(values))


def int_within(low: int, high: float = math.inf):
    """An argparse ``type``: an integer within low..high, or argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {_bound(low, high)}, got {value}")
        return value
    return parse


def _bound(low: int, high: float) -> str:
    return f"within {low}..{high}" if high < math.inf else f"at least {low}"


def _progress(message: str) -> None:
    print(message, flush=True)


def run_bench(out: Path, lengths, batches, layers: int, budget: float, command: str,
              log=_progress, device: str = "all") -> dict:
    with staged_folder(out, report.JSON_NAME) as staging:  # a stopped bench leaves nothing
        run = _timed_run(staging, lengths, batches, layers, budget, command, log, device)
        written = [out / path.relative_to(staging) for path in report.save(run, staging)]
    log("\n" + report.markdown(run))
    log("wrote " + ", ".join(str(p) for p in written))
    return run


def _timed_run(out: Path, lengths, batches, layers: int, budget: float, command: str,
               log, device: str) -> dict:
    started = time.time()
    mra, dense = models.build_models(layers)
    backends = models.backends(mra, dense, out / "models", log, device)
    run = {"command": command, "machine": _machine(), "layers": layers,
           "model": f"{layers} layer(s), hidden 768, 12 heads, intermediate 3072; MRA 8 blocks per "
                    "row at 4096 positions (mode full), dense = RoBERTa with SDPA",
           "model_short": f"{layers} layer(s), mra-base shapes",
           "backends": [{"name": b.name, "model": b.model, "runtime": b.runtime,
                         **({"skipped": b.skipped} if b.skipped else {})} for b in backends],
           "results": []}
    cells = [(batch, length) for batch in batches for length in sorted(lengths)]
    for index, (batch, length) in enumerate(cells, 1):
        row = {"batch": batch, "length": length, "backends": {}}
        for backend in (b for b in backends if not b.skipped):
            log(f"[{index}/{len(cells)}] batch {batch}, {length} tokens: {backend.name} ...")
            row["backends"][backend.name] = _measure_cell(backend, batch, length, budget)
        run["results"].append(row)
    run["targets"] = report.targets(run)
    run["seconds"] = round(time.time() - started, 1)
    return run


def _measure_cell(backend, batch: int, length: int, budget: float) -> dict:
    if backend.name in DENSE_ON_CPU:  # it materialises batch x heads x S x S floats
        needed = models.dense_attention_bytes(batch, length)
        if needed > 0.5 * models.available_bytes():
            return {"skipped": f"needs ~{needed / 2**30:.1f} GB of attention scores, more than "
                               "half the memory available here"}
    try:
        result = measure(backend.prepare(batch, length), budget_s=budget, on_gpu=backend.on_gpu)
    except Exception as error:  # onnxruntime's and Polygraphy's errors are not RuntimeErrors
        result = {"skipped": f"failed: {first_line(error)[:200]}"}
    gc.collect()
    return result


def _machine() -> str:
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs (torch threads "
            f"{threads}), {gpu}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name, which the results depend on (matrix products on two x86 CPUs of the
    same count differed 2x here); the architecture where the system does not say."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()
