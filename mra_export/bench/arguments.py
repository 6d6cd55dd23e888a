"""Arguments of ``mra-export bench``: without torch or onnxruntime, so that the command line's
help is quick."""

from __future__ import annotations

LENGTHS = (256, 512, 1024, 2048, 4096)
BATCHES = (1, 8)
DEVICES = ("all", "cpu", "cuda")


def add_bench_arguments(parser) -> None:
    parser.add_argument("--out", default="out/bench", help="folder for bench.json, bench.md and "
                        "the plots (default out/bench)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help=f"token counts (default: {','.join(map(str, LENGTHS))})")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help=f"batch sizes (default: {','.join(map(str, BATCHES))})")
    parser.add_argument("--layers", type=int, default=1,
                        help="encoder layers (default 1; times are per layer then)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed runs per cell at most, at least 3 runs (default: 20)")
    parser.add_argument("--device", choices=DEVICES, default="all",
                        help="which columns: cpu, cuda (PyTorch and onnxruntime on the GPU in fp32 "
                        "and fp16, and TensorRT) or all (default)")
