#!/usr/bin/env python3
"""One command on a CUDA machine with PyTorch: build the MRA CUDA kernels, check them against the
PyTorch reference, and time them against it and against dense attention.

    python tools/gpu_check.py [--out gpu_check.json] [--quick] [--library SO] [--no-timing]

1. builds plugins/ (CMake, with the nvcc of PyTorch's CUDA_HOME when there is one) for this GPU's
   architecture into plugins/build-gpu;
2. correctness on random inputs: batch 1-8, 12 heads, lengths 128-4096 (and odd ones), head_dim
   32, 64 and 128, fp32, fp16 and bf16, both modes, with and without priors, ragged masks and an
   all-padding sample, judged by mra_export.kernel_check: max error (fp32 absolute, fp16/bf16
   relative to the largest output), blocks selected differently, and the rare queries whose row
   max sits on a 1e-3 step (counted, bounded);
3. speed at 512-4096 tokens, batch 1 and 8, 12 heads, head_dim 64, 8 blocks per row: median
   CUDA-event times of the kernels, of mra_export's PyTorch reference on the same GPU, and of
   dense torch.nn.functional.scaled_dot_product_attention; achieved bandwidth (Q, K, V read once
   plus the output) against a measured device-to-device copy.
``--library`` takes a libmra_attention_cuda.so built beforehand instead of step 1, and
``--no-timing`` leaves out step 3 (both for a lent GPU's scarce minutes: tools/gpu_session.sh).
Prints one table and writes JSON. Without a GPU, `--emulated` runs step 2 alone on the kernels'
source compiled for the CPU under plugins/tests/cuda_emulation (their logic, not their speed or
tensor-core rounding), each buffer and each section of the workspace against an unmapped page
after its end (``--fence before``: before its start), so a read or write across the edge faults.
Targets (issue 4): fp32 error <= 1e-5, fp16 <= 2e-3 and bf16 <= 1e-2 relative, the same
selection (up to ties within an ulp); at 4096 tokens, batch 1, the kernels >= 5x faster than the
PyTorch reference and faster than dense SDPA.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mra_export import native  # noqa: E402
from mra_export.attention import mra_attention  # noqa: E402
from mra_export.errors import UserError  # noqa: E402
from mra_export.fenced_memory import SIDES  # noqa: E402
from mra_export.files import atomic_write_text, check_writable_file  # noqa: E402
from mra_export.kernel_check import compare_with_reference  # noqa: E402

BLOCKS_PER_ROW = 8
HEADS, HEAD_DIM = 12, 64


def build_kernels(build_dir: Path) -> native.MraLibrary:
    major, minor = torch.cuda.get_device_capability()
    architecture = f"{major}{minor}"
    print(f"building the kernels for sm_{architecture} in {build_dir} ...", flush=True)
    configure = ["cmake", "-S", str(ROOT / "plugins"), "-B", str(build_dir),
                 f"-DMRA_CUDA_ARCHITECTURES={architecture}"]
    # Imported here: on a machine without a GPU, a CUDA build of torch logs a warning on import.
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if nvcc.is_file():
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    build = ["cmake", "--build", str(build_dir), "--target", "mra_attention_cuda", "-j",
             str(os.cpu_count() or 4)]
    for command in (configure, build):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"gpu_check: {' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return native.MraLibrary(build_dir / native.CUDA_LIBRARY)


def build_emulated_kernels() -> native.MraLibrary:
    """The kernels' source under the CPU CUDA emulation, from `make plugins`' build folder."""
    try:
        return native.MraLibrary(native.ensure_built(native.CUDA_EMULATED_LIBRARY,
                                                     "mra_attention_cuda_emulated"))
    except UserError as error:
        sys.exit(f"gpu_check: {error}")


def inputs(batch: int, seq_len: int, dtype, seed: int, head_dim: int = HEAD_DIM, device: str = "cuda"):
    """Random Q, K, V and a ragged mask: sample 0 full, the last one all padding when batch > 2."""
    generator = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, HEADS, seq_len, head_dim, device=device, generator=generator).to(dtype)
               for _ in range(3))
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), device=device, generator=generator)
    lengths[0] = seq_len
    if batch > 2:
        lengths[-1] = 0
    mask = (torch.arange(seq_len, device=device)[None, :] < lengths[:, None]).to(torch.int32)
    return q, k, v, mask


def settings(seq_len: int, mode: str, priors: bool = False) -> dict:
    kw = dict(num_blocks=BLOCKS_PER_ROW * ((seq_len + 31) // 32), approx_mode=mode)
    if priors:
        kw.update(initial_prior_first_n_blocks=2, initial_prior_diagonal_n_blocks=5)
    return kw


TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # fp32 absolute


def correctness_cases(quick: bool):
    """(batch, seq_len, head_dim, dtype, mode, priors)."""
    shapes = [(1, 128), (8, 1000), (2, 4096)] if quick else [
        (1, 128), (3, 31), (8, 512), (8, 1000), (4, 2048), (1, 4096), (2, 4096)]
    for batch, seq_len in shapes:
        for dtype in TOLERANCES:
            for mode in ("full", "sparse"):
                yield batch, seq_len, HEAD_DIM, dtype, mode, False
        yield batch, seq_len, HEAD_DIM, torch.float32, "full", True
    for head_dim in (32, 128):
        for dtype in TOLERANCES:
            yield 4, 1000, head_dim, dtype, "full", head_dim == 32


def check_correctness(lib, cases, device: str = "cuda") -> list[dict]:
    """One row per case of ``correctness_cases``; ``lib`` on ``device`` (the CPU twin in CI)."""
    rows = []
    for batch, seq_len, head_dim, dtype, mode, priors in cases:
        q, k, v, mask = inputs(batch, seq_len, dtype, seed=seq_len + batch + head_dim, head_dim=head_dim,
                               device=device)
        kw = settings(seq_len, mode, priors)
        ours, chosen = lib.attention(q, k, v, mask, **kw)
        result = compare_with_reference(ours, chosen, q, k, v, mask, tolerance=TOLERANCES[dtype],
                                        relative=dtype != torch.float32, **kw)
        rows.append(dict(batch=batch, seq_len=seq_len, head_dim=head_dim, dtype=str(dtype).split(".")[-1],
                         mode=mode, priors=priors, error_kind="abs" if dtype == torch.float32 else "rel",
                         **dataclasses.asdict(result), same_blocks=result.same_blocks, passed=result.passed))
        del q, k, v, mask, ours
    return rows


def median_ms(function, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_call(lib, q, k, v, mask, **kw):
    """A closure calling mraAttentionCuda with buffers allocated once (what the plugin does)."""
    params = lib.params(q, **kw)
    size = lib.lib.mraWorkspaceSize(ctypes.byref(params))
    workspace = torch.empty(size, dtype=torch.uint8, device="cuda")
    output = torch.empty_like(q)
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in (q, k, v, mask, output)]
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def call():
        lib.check(lib.lib.mraAttentionCuda(ctypes.byref(params), *pointers, ctypes.c_void_p(workspace.data_ptr()),
                                           ctypes.c_size_t(size), stream))
    return call


def copy_bandwidth_gbs() -> float:
    source = torch.empty(2 * 1024**3 // 4, device="cuda")
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), repeats=10)
    return 2 * source.numel() * 4 / (ms / 1e3) / 1e9  # bytes read + written


def benchmark(lib, quick: bool, bandwidth: float) -> list[dict]:
    rows = []
    lengths = (1024, 4096) if quick else (512, 1024, 2048, 4096)
    for batch in (1, 8):
        for seq_len in lengths:
            row = dict(batch=batch, seq_len=seq_len)
            for dtype in (torch.float32, torch.float16):
                row.update(time_one(lib, batch, seq_len, dtype, bandwidth))
                torch.cuda.empty_cache()  # the inputs went with time_one's frame
            rows.append(row)
            print(f"  timed batch {batch}, {seq_len} tokens", flush=True)
    return rows


def time_one(lib, batch: int, seq_len: int, dtype, bandwidth: float) -> dict:
    """Kernels, the PyTorch reference and dense SDPA on the same inputs: {column: value}."""
    name = str(dtype).split(".")[-1]
    q, k, v, mask = inputs(batch, seq_len, dtype, seed=7)
    kw = settings(seq_len, "full")
    kernel_ms = median_ms(kernel_call(lib, q, k, v, mask, **kw))
    moved = 4 * q.numel() * q.element_size()  # Q, K, V read once, the output written
    row = {f"kernels_{name}_ms": kernel_ms, f"kernels_{name}_gbs": moved / (kernel_ms / 1e3) / 1e9}
    row[f"kernels_{name}_bandwidth_fraction"] = row[f"kernels_{name}_gbs"] / bandwidth
    with torch.no_grad():
        row[f"pytorch_{name}_ms"] = median_ms(lambda: mra_attention(q, k, v, mask, **kw), repeats=10)
        additive = torch.zeros(batch, 1, 1, seq_len, device=q.device, dtype=dtype).masked_fill(
            mask[:, None, None, :] == 0, float("-inf"))
        row[f"sdpa_{name}_ms"] = median_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive))
    row[f"speedup_vs_pytorch_{name}"] = row[f"pytorch_{name}_ms"] / kernel_ms
    row[f"speedup_vs_sdpa_{name}"] = row[f"sdpa_{name}_ms"] / kernel_ms
    return row


def print_tables(correctness, timings, bandwidth, device):
    print(f"\n{device}; device-to-device copy {bandwidth:.0f} GB/s (read + write)")
    print_correctness(correctness)
    print_speed(timings)


def print_correctness(correctness):
    print("\ncorrectness (CUDA kernels vs mra_export.mra_attention; fp16/bf16 relative to the largest output;"
          "\n  'step': queries on a 1e-3 row-max step, 'ties': blocks swapped within an ulp of the threshold)")
    print(f"{'batch':>5} {'seq':>5} {'D':>4} {'dtype':>9} {'mode':>6} {'priors':>6} {'error':>10} {'target':>8} "
          f"{'blocks':>7} {'ties':>5} {'step':>5}  result")
    for r in correctness:
        blocks = "same" if r["same_blocks"] else ("ties" if r["untied_blocks"] == 0 else "DIFFER")
        print(f"{r['batch']:>5} {r['seq_len']:>5} {r['head_dim']:>4} {r['dtype']:>9} {r['mode']:>6} "
              f"{'yes' if r['priors'] else 'no':>6} {r['max_error']:>10.2e} {r['tolerance']:>8.0e} {blocks:>7} "
              f"{r['tied_blocks']:>5} {r['step_queries']:>5}  {'pass' if r['passed'] else 'FAIL'}")


def print_speed(timings):
    print(f"\nspeed ({HEADS} heads, head_dim {HEAD_DIM}, {BLOCKS_PER_ROW} blocks per row, mode full; median ms)")
    print(f"{'batch':>5} {'seq':>5} | {'kern32':>8} {'torch32':>8} {'sdpa32':>8} {'x torch':>8} {'x sdpa':>7} | "
          f"{'kern16':>8} {'torch16':>8} {'sdpa16':>8} {'x torch':>8} {'x sdpa':>7} | {'GB/s 16':>8}")
    for r in timings:
        print(f"{r['batch']:>5} {r['seq_len']:>5} | {r['kernels_float32_ms']:>8.3f} {r['pytorch_float32_ms']:>8.3f} "
              f"{r['sdpa_float32_ms']:>8.3f} {r['speedup_vs_pytorch_float32']:>8.1f} {r['speedup_vs_sdpa_float32']:>7.2f} | "
              f"{r['kernels_float16_ms']:>8.3f} {r['pytorch_float16_ms']:>8.3f} {r['sdpa_float16_ms']:>8.3f} "
              f"{r['speedup_vs_pytorch_float16']:>8.1f} {r['speedup_vs_sdpa_float16']:>7.2f} | {r['kernels_float16_gbs']:>8.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON results")
    parser.add_argument("--build-dir", default=str(native.GPU_CHECK_BUILD_DIR))
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--library", type=Path,
                        help="a libmra_attention_cuda.so built beforehand (no CMake build here; "
                             "with --emulated, a libmra_attention_cuda_emulated.so)")
    parser.add_argument("--no-timing", action="store_true", help="correctness only")
    parser.add_argument("--emulated", action="store_true",
                        help="no GPU needed: the correctness cases on the kernels' source under the CPU "
                             "CUDA emulation (plugins/tests/cuda_emulation); no timings")
    parser.add_argument("--fence", choices=SIDES, default="after",
                        help="with --emulated: where each buffer and workspace section meets an "
                             "unmapped page, so a read or write across that edge faults "
                             "(mra_export/fenced_memory.py, plugins/tests/cuda_emulation/fencedWorkspace.cpp)")
    args = parser.parse_args()
    try:
        check_writable_file(args.out)  # now, not after minutes of a lent GPU's time
    except UserError as error:
        parser.error(str(error))
    if not args.emulated and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to PyTorch; run this on a machine with one (or with --emulated "
              "to check the kernels' logic on the CPU)", file=sys.stderr)
        return 2
    started = time.time()
    try:
        lib = load_kernels(args)
    except UserError as error:  # a library that is missing, foreign or of another version
        parser.error(str(error))
    if args.emulated:
        lib.set_fence(args.fence)
        return check_emulated(args, lib, started)
    device = torch.cuda.get_device_name()
    print("checking correctness ...", flush=True)
    correctness = check_correctness(lib, correctness_cases(args.quick))
    if args.no_timing:
        bandwidth, timings = None, []
        print_correctness(correctness)
    else:
        bandwidth = copy_bandwidth_gbs()
        print("timing ...", flush=True)
        timings = benchmark(lib, args.quick, bandwidth)
        print_tables(correctness, timings, bandwidth, device)
    return write_result(args.out, dict(device=device, torch=torch.__version__, cuda=torch.version.cuda,
                                       command=" ".join(sys.argv), copy_bandwidth_gbs=bandwidth,
                                       correctness=correctness, timings=timings,
                                       passed=all(r["passed"] for r in correctness),
                                       seconds=time.time() - started))


def load_kernels(args) -> native.MraLibrary:
    """``--library``'s, else the kernels built here: for this GPU, or under the CPU emulation."""
    if args.library:
        return native.MraLibrary(args.library)
    return build_emulated_kernels() if args.emulated else build_kernels(Path(args.build_dir))


FENCED_EDGE = {"after": "after its end", "before": "before its start"}


def check_emulated(args, lib: native.MraLibrary, started: float) -> int:
    device = ("CPU emulation of the CUDA kernels (plugins/tests/cuda_emulation), not a GPU; "
              f"each buffer and workspace section fenced by an unmapped page {FENCED_EDGE[lib.fence]}")
    print("checking correctness under the emulation ...", flush=True)
    correctness = check_correctness(lib, correctness_cases(args.quick), device="cpu")
    print(f"\n{device}; no timings (an emulation says nothing of speed)")
    print_correctness(correctness)
    return write_result(args.out, dict(device=device, torch=torch.__version__, command=" ".join(sys.argv),
                                       correctness=correctness, timings=[],
                                       passed=all(r["passed"] for r in correctness),
                                       seconds=time.time() - started))


def write_result(out: str, result: dict) -> int:
    """The JSON (after minutes of work: all or nothing), the verdict, and the exit status."""
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"\n{'ALL CORRECTNESS CHECKS PASSED' if result['passed'] else 'CORRECTNESS FAILURES ABOVE'}; "
          f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
