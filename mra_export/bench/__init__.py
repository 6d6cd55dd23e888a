"""``mra-export bench``: MRA against dense attention of the same size, by length and batch."""

from .cli import add_bench_arguments, run_bench_from_args

__all__ = ["add_bench_arguments", "run_bench_from_args"]
