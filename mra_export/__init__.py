"""mra-export: transformers' MRA models on every CPU and GPU, in ONNX, onnxruntime and TensorRT.

- ``mra_attention``: MRA-2 attention exactly as transformers computes it, in portable PyTorch.
- ``patch_model``: make any transformers ``Mra*`` model use it.
"""

from .attention import mra_attention
from .patching import patch_model

__all__ = ["mra_attention", "patch_model"]
__version__ = "0.1.0"
