"""Running exported MRA models: onnxruntime (``OrtMraModel``) and TensorRT (``TrtMraModel``)."""

from .ort import OrtMraModel
from .trt import TrtMraModel  # imports TensorRT and Polygraphy's TensorRT backend only when used

__all__ = ["OrtMraModel", "TrtMraModel"]
