"""Whether TensorRT can run here, and if not, the one line that says why and how to get it."""

from __future__ import annotations

import importlib.util

from ..errors import MissingTensorRT


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT's Python package and a CUDA GPU are present; else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return str(MissingTensorRT("building TensorRT engines"))
    import torch

    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is visible (TensorRT engines need one)"
    return None


def require_tensorrt(what: str):
    """Import and return ``tensorrt``, or raise ``MissingTensorRT`` naming ``what``."""
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingTensorRT(what)
    import tensorrt

    return tensorrt
