"""Whether TensorRT can run here, and if not, the one line that says why and how to get it."""

from __future__ import annotations

import importlib.util

from ..errors import MissingTensorRT, UserError, first_line


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT's Python package loads and a CUDA GPU is present; else why not."""
    try:
        require_tensorrt("building TensorRT engines")
    except UserError as error:
        return str(error)
    import torch

    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is visible (TensorRT engines need one)"
    return None


def require_tensorrt(what: str):
    """Import and return ``tensorrt``, or raise ``MissingTensorRT`` naming ``what``; a package
    whose libraries do not load (e.g. PyPI's stub without its CUDA libraries) says so in one line."""
    if importlib.util.find_spec("tensorrt") is None:
        raise MissingTensorRT(what)
    try:
        import tensorrt
    except Exception as error:  # ImportError, OSError from its shared libraries, or its own
        raise UserError(f"{what} needs TensorRT, whose Python package is installed but does not "
                        f"load ({first_line(error)}); reinstall it on this NVIDIA machine with "
                        "pip install -e '.[gpu]' in the mra-export checkout") from None
    return tensorrt
