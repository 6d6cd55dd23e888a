#!/usr/bin/env python3
"""The CUDA kernels on a few tiny cases, for compute-sanitizer to watch:

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tools/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize_kernels.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python tools/sanitize_kernels.py

fp32, fp16 and bf16; both modes, with and without priors; ragged masks and an all-padding
sample; head_dim 64 (--head-dims 32 64 128 for every tile width); 2 samples, 2 heads, 100-800
tokens, so that the sanitizers' 10-100x slowdown leaves seconds of GPU time; at 800 tokens (625
cells a row) the selection runs in clusters of 2 CTAs on a GPU that has them and SMs to spare.
Each call is synchronised and its output held to the PyTorch reference (mra_export.kernel_check).
Exits 1 if a kernel call returns an error or an output is wrong, 2 if there is no GPU or no
library.
--emulated runs the same cases on the kernels' source under the CPU CUDA emulation (to check
this script where there is no GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mra_export import native  # noqa: E402
from mra_export.errors import UserError  # noqa: E402
from mra_export.kernel_check import compare_with_reference  # noqa: E402

BATCH, HEADS = 2, 2
# Against the PyTorch reference: fp32 absolute, fp16 and bf16 relative to the largest output.
TOLERANCES = {torch.float32: (1e-5, False), torch.float16: (2e-3, True),
              torch.bfloat16: (1e-2, True)}
# (tokens, real tokens per sample, kernel settings): odd lengths, a partial last block.
CASES = [
    (300, [300, 111], dict(num_blocks=30, approx_mode="full", initial_prior_first_n_blocks=1,
                           initial_prior_diagonal_n_blocks=3)),
    (300, [300, 111], dict(num_blocks=12, approx_mode="sparse")),  # rows with no block at all
    (100, [77, 0], dict(num_blocks=4, approx_mode="sparse", initial_prior_diagonal_n_blocks=2)),
    (800, [800, 500], dict(num_blocks=50, approx_mode="full")),  # a row's cells over 2 CTAs
]


def default_library() -> Path | None:
    """libmra_attention_cuda.so from `make plugins`' build folder, or else tools/gpu_check.py's."""
    for folder in (native.build_dir(), native.GPU_CHECK_BUILD_DIR):
        if (folder / native.CUDA_LIBRARY).is_file():
            return folder / native.CUDA_LIBRARY
    return None


def case_inputs(seq_len: int, lengths: list[int], head_dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, seq_len, head_dim, generator=generator).to(dtype)
               for _ in range(3))
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).float()
    return q, k, v, mask


def run_case(lib: native.MraLibrary, device: str, seq_len: int, lengths: list[int],
             settings: dict, head_dim: int, dtype: torch.dtype) -> str | None:
    """One kernel call, synchronised; None if its output is right, else what is wrong. A kernel
    that returns an error raises RuntimeError (MraLibrary.check)."""
    q, k, v, mask = case_inputs(seq_len, lengths, head_dim, dtype, seed=seq_len + head_dim)
    output, selected = lib.attention(*(t.to(device) for t in (q, k, v, mask)), **settings)
    if device == "cuda":
        torch.cuda.synchronize()  # a fault of the kernels surfaces here, as a RuntimeError
    tolerance, relative = TOLERANCES[dtype]
    result = compare_with_reference(output.cpu(), selected.cpu(), q, k, v, mask,
                                    tolerance=tolerance, relative=relative, **settings)
    return None if result.passed else result.summary()


def run_all(lib: native.MraLibrary, device: str, head_dims: list[int]) -> int:
    failures = 0
    for head_dim in head_dims:
        for dtype in TOLERANCES:
            for seq_len, lengths, settings in CASES:
                name = (f"head_dim {head_dim} {str(dtype).removeprefix('torch.')} S={seq_len} "
                        f"lengths {lengths} {settings}")
                wrong = run_case(lib, device, seq_len, lengths, settings, head_dim, dtype)
                print(f"ok   {name}" if wrong is None else f"FAIL {name}: {wrong}", flush=True)
                failures += wrong is not None
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path,
                        help=f"the kernels' library (default: {native.CUDA_LIBRARY} in "
                             f"{native.build_dir()} or {native.GPU_CHECK_BUILD_DIR})")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64], choices=[32, 64, 128])
    parser.add_argument("--emulated", action="store_true",
                        help="the kernels' source under the CPU CUDA emulation, no GPU")
    args = parser.parse_args(argv)
    if args.emulated:
        library, device = args.library or native.build_dir() / native.CUDA_EMULATED_LIBRARY, "cpu"
    else:
        if not torch.cuda.is_available():
            print("sanitize_kernels: no CUDA GPU visible to PyTorch", file=sys.stderr)
            return 2
        library, device = args.library or default_library(), "cuda"
    if library is None or not Path(library).is_file():
        print(f"sanitize_kernels: {library or native.CUDA_LIBRARY} is not built (make plugins, "
              "or --library PATH)", file=sys.stderr)
        return 2
    started = time.time()
    try:
        failures = run_all(native.MraLibrary(library), device, args.head_dims)
    except (RuntimeError, UserError) as error:  # a kernel's error status, or a CUDA fault
        print(f"sanitize_kernels: {error}", file=sys.stderr)
        return 1
    print(f"sanitize_kernels: {failures} wrong outputs, {time.time() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
