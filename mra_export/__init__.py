"""mra-export: transformers' MRA models on every CPU and GPU, in ONNX, onnxruntime and TensorRT.

- ``mra_attention``: MRA-2 attention exactly as transformers computes it, in portable PyTorch.
- ``patch_model``: make any transformers ``Mra*`` model use it.
"""

from .lazy import lazy_names

__all__ = ["mra_attention", "patch_model"]
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_names(__name__, globals(), {"mra_attention": ".attention",
                                                        "patch_model": ".patching"})
