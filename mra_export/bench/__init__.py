"""``mra-export bench``: MRA against dense attention of the same size, by length and batch.

``run_bench_from_args`` (torch, onnxruntime) is imported on first use, so that the command
line's help, which needs ``add_bench_arguments`` alone, stays quick.
"""

from ..lazy import lazy_names
from .arguments import add_bench_arguments

__all__ = ["add_bench_arguments", "run_bench_from_args"]
__getattr__, __dir__ = lazy_names(__name__, globals(), {"run_bench_from_args": ".cli"})
