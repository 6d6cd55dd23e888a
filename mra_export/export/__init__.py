"""ONNX export of the six MRA heads, in the portable and the plugin flavour.

The exporter (torch, transformers, onnxscript) is imported on first use of its names, so that
``export.info`` (what an export folder holds) and the command line's help stay light.
"""

from ..lazy import lazy_names
from .info import FLAVOURS, ExportInfo

__all__ = ["DTYPES", "FLAVOURS", "ExportInfo", "export_model", "reusing_traces"]
__getattr__, __dir__ = lazy_names(__name__, globals(), {"DTYPES": ".exporter",
                                                        "export_model": ".exporter",
                                                        "reusing_traces": ".attention_function"})
