"""The running system's TensorRT version and GPU, for the engine manifest and its checks."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .availability import require_tensorrt
from .manifest import EngineManifest, SystemInfo


def current_system(what: str = "this command") -> SystemInfo:
    """TensorRT's version and the current CUDA device; fails in one line where either is absent."""
    tensorrt = require_tensorrt(what)
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{what} needs a CUDA GPU for TensorRT, and none is visible here")
    major, minor = torch.cuda.get_device_capability()
    return SystemInfo(tensorrt_version=tensorrt.__version__, gpu_name=torch.cuda.get_device_name(),
                      compute_capability=f"{major}.{minor}")


def fitting_manifest(folder: str | Path, what: str) -> EngineManifest:
    """The manifest of an engine folder that fits this machine; else one line saying what differs
    and how to rebuild (see ``EngineManifest.refusal``)."""
    system = current_system(what)
    manifest = EngineManifest.load(folder)
    refusal = manifest.refusal(system, folder)
    if refusal:
        raise UserError(refusal)
    return manifest
