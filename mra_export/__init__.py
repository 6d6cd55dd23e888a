"""mra-export: transformers' MRA models on every CPU and GPU, in ONNX, onnxruntime and TensorRT.

- ``mra_attention``: MRA-2 attention exactly as transformers computes it, in portable PyTorch.
- ``patch_model``: make any transformers ``Mra*`` model use it.
"""

__all__ = ["mra_attention", "patch_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Imported on first use, so that ``mra-export`` starts (and takes Ctrl-C) before torch."""
    if name == "mra_attention":
        from .attention import mra_attention
        return mra_attention
    if name == "patch_model":
        from .patching import patch_model
        return patch_model
    raise AttributeError(f"module 'mra_export' has no attribute {name!r}")
