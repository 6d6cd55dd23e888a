"""ONNX export of the six MRA heads, in the portable and the plugin flavour."""

from .attention_function import reusing_traces
from .exporter import DTYPES, FLAVOURS, export_model
from .info import ExportInfo

__all__ = ["DTYPES", "FLAVOURS", "ExportInfo", "export_model", "reusing_traces"]
