"""Arguments of ``mra-export build``."""

from __future__ import annotations

import argparse

from .spec import PRECISIONS


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", help="OUT/model.onnx of a plugin-flavour export")
    parser.add_argument("--plugin", help="the MraAttention plugin library (make plugins builds "
                        "plugins/build/libmra_attention_plugin.so)")
    parser.add_argument("--out", help="engine folder, e.g. engines/NAME")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="default: the export's own type")
    parser.add_argument("--shapes", help="optimisation profile, e.g. "
                        "batch=1/4/8,sequence=1/128/512[,choices=1/2/4] (min/opt/max); default "
                        "batch 1/1/8 and sequence 1/128/max_position_embeddings")
    parser.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to reuse")
    parser.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit")
    parser.add_argument("--attention-outputs", action="store_true", default=None,
                        help="also output every layer's attention context (for the parity "
                        "per-head diagnostic)")
    parser.add_argument("--spec", metavar="FILE", help="a build spec (engines/specs/*.json); "
                        "flags given here override it")
