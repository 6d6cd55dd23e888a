"""``mra-export bench``: MRA against dense attention of the same size, by length and batch.

``run_bench_from_args`` (torch, onnxruntime) is imported on first use, so that the command
line's help, which needs ``add_bench_arguments`` alone, stays quick.
"""

from __future__ import annotations

from .arguments import add_bench_arguments

__all__ = ["add_bench_arguments", "run_bench_from_args"]


def __getattr__(name: str):
    if name != "run_bench_from_args":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .cli import run_bench_from_args

    return run_bench_from_args
