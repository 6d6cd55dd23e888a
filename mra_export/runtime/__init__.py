"""Running exported MRA models: onnxruntime (``OrtMraModel``) and TensorRT (``TrtMraModel``)."""

from .ort import OrtMraModel

__all__ = ["OrtMraModel"]
