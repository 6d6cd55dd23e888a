"""ONNX export of the six MRA heads, in the portable and the plugin flavour.

The exporter (torch, transformers, onnxscript: seconds to import) is imported on first use of
its names, so that ``export.info`` (what an export folder holds) and the command line's help
stay light.
"""

from __future__ import annotations

import importlib

_WHERE = {"DTYPES": "exporter", "export_model": "exporter", "reusing_traces": "attention_function",
          "FLAVOURS": "info", "ExportInfo": "info"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
