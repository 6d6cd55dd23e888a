"""Which backends a parity run checks, how to load each, and why any is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from ..export.info import ExportInfo
from ..native import CPU_LIBRARY, build_dir
from ..runtime.ort import CPU, CUDA, OrtMraModel
from ..runtime.plugin_reference import ReferencePluginModel

FP32_TOLERANCE = 1e-4  # onnxruntime and the CPU references against PyTorch, on every output
NO_TENSORRT = ("TensorRT is not installed here (pip install 'mra-export[gpu]' on an NVIDIA "
               "machine)")


@dataclasses.dataclass
class Backend:
    name: str
    source: str
    tolerance: float
    load: Callable | None = None  # -> ExportedModel
    skipped: str | None = None


def export_backends(folder: str | Path) -> list[Backend]:
    folder = str(folder)
    info = ExportInfo.load(folder)
    if info.flavour == "plugin":
        return [Backend("plugin graph on CPU (onnx.reference, PyTorch node)", folder,
                        FP32_TOLERANCE, lambda: ReferencePluginModel.from_pretrained(folder)),
                _cpp_node_backend(folder)]
    backends = [Backend("onnxruntime-cpu", folder, FP32_TOLERANCE,
                        lambda: OrtMraModel.from_pretrained(folder, provider=CPU))]
    if CUDA in ort.get_available_providers():
        cuda = [(CUDA, {"use_tf32": "0"}), CPU]  # TF32 would move results by ~1e-3
        backends.append(Backend("onnxruntime-cuda", folder, FP32_TOLERANCE,
                                lambda: OrtMraModel.from_pretrained(folder, provider=cuda)))
    else:
        backends.append(Backend("onnxruntime-cuda", folder, FP32_TOLERANCE, skipped=(
            "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu on an "
            "NVIDIA machine)")))
    return backends


def _cpp_node_backend(folder: str) -> Backend:
    """The plugin graph with its MraAttention nodes computed by the plugin's C++ CPU twin."""
    name = "plugin graph on CPU (onnx.reference, C++ plugin twin)"
    path = build_dir() / CPU_LIBRARY
    if not path.is_file():
        return Backend(name, folder, FP32_TOLERANCE,
                       skipped=f"{path} is not built (make plugins)")
    return Backend(name, folder, FP32_TOLERANCE,
                   lambda: ReferencePluginModel.from_pretrained(folder, node="cpp"))


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def engine_backends(engines) -> list[Backend]:
    if not engines:
        reason = ("no engine given (mra-export build makes one)" if tensorrt_available()
                  else NO_TENSORRT)
        return [Backend("tensorrt", "-", 0.0, skipped=reason)]
    if not tensorrt_available():
        return [Backend("tensorrt", str(engine), 0.0, skipped=NO_TENSORRT) for engine in engines]
    from ..engines.backend import tensorrt_backend  # needs TensorRT

    return [tensorrt_backend(engine) for engine in engines]
