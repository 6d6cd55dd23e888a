"""ONNX export of the six MRA heads, in the portable and the plugin flavour."""

from .exporter import FLAVOURS, export_model
from .info import ExportInfo

__all__ = ["FLAVOURS", "ExportInfo", "export_model"]
