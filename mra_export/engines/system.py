"""The running system's TensorRT version and GPU, for the engine manifest and its checks."""

from __future__ import annotations

from .availability import require_tensorrt
from .manifest import SystemInfo


def current_system(what: str = "this command") -> SystemInfo:
    """TensorRT's version and the current CUDA device; fails in one line where either is absent."""
    tensorrt = require_tensorrt(what)
    import torch

    if not torch.cuda.is_available():
        from ..errors import UserError

        raise UserError(f"{what} needs a CUDA GPU for TensorRT, and none is visible here")
    major, minor = torch.cuda.get_device_capability()
    return SystemInfo(tensorrt_version=tensorrt.__version__, gpu_name=torch.cuda.get_device_name(),
                      compute_capability=f"{major}.{minor}")
