"""ONNX export of the six MRA heads, in the portable and the plugin flavour."""

from .exporter import DTYPES, FLAVOURS, export_model
from .info import ExportInfo

__all__ = ["DTYPES", "FLAVOURS", "ExportInfo", "export_model"]
