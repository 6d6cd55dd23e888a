"""Which backends a parity run checks, how to load each, and why any is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from ..export.info import ExportInfo
from ..native import CPU_LIBRARY, PLUGIN_EMULATED_LIBRARY, PLUGIN_RUNNER_LIBRARY, build_dir
from ..runtime.ort import BF16_NOT_ON_CPU, CPU, CUDA, CUDA_FP32, OrtMraModel
from ..runtime.plugin_reference import ReferencePluginModel

# Absolute tolerance on every output against the float32 PyTorch model, by the graph's type:
# fp32 for onnxruntime and the CPU references; fp16/bf16 as for TensorRT engines of that type.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
NO_TENSORRT = ("TensorRT is not installed here (pip install 'mra-export[gpu]' on an NVIDIA "
               "machine)")


@dataclasses.dataclass
class Backend:
    name: str
    source: str
    tolerance: float
    load: Callable | None = None  # -> ExportedModel
    skipped: str | None = None
    attention: bool = True  # whether it can output the attention contexts


def export_backends(folder: str | Path) -> list[Backend]:
    """The backends that run an export folder whose files run_parity has verified (the loaders
    do not hash them again)."""
    folder = str(folder)
    info = ExportInfo.load(folder)
    tolerance = TOLERANCES[info.dtype]
    if info.flavour == "plugin":
        return [Backend("plugin graph on CPU (onnx.reference, PyTorch node)", folder,
                        tolerance, lambda: ReferencePluginModel.from_pretrained(folder, verify=False)),
                _node_backend(folder, tolerance, "cpp", "C++ plugin twin", [CPU_LIBRARY]),
                _node_backend(folder, tolerance, "plugin-emulated",
                              "plugin on emulated CUDA",
                              [PLUGIN_EMULATED_LIBRARY, PLUGIN_RUNNER_LIBRARY])]
    if info.dtype == "bf16":
        backends = [Backend("onnxruntime-cpu", folder, tolerance, skipped=BF16_NOT_ON_CPU)]
    else:
        backends = [Backend("onnxruntime-cpu", folder, tolerance,
                            lambda: OrtMraModel.from_pretrained(folder, provider=CPU, verify=False))]
    if CUDA in ort.get_available_providers():
        cuda = [CUDA_FP32, CPU]
        backends.append(Backend("onnxruntime-cuda", folder, tolerance,
                                lambda: OrtMraModel.from_pretrained(folder, provider=cuda, verify=False)))
    else:
        backends.append(Backend("onnxruntime-cuda", folder, tolerance, skipped=(
            "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu on an "
            "NVIDIA machine)")))
    return backends


def _node_backend(folder: str, tolerance: float, node: str, computed_by: str,
                  libraries: list[str]) -> Backend:
    """The plugin graph with its MraAttention nodes computed by ``node`` (built by make plugins;
    the plugin over the emulated kernels only where TensorRT's headers are)."""
    name = f"plugin graph on CPU (onnx.reference, {computed_by})"
    missing = [build_dir() / library for library in libraries
               if not (build_dir() / library).is_file()]
    if missing:
        how = ("make plugins TensorRT_ROOT=<folder with TensorRT's include/>"
               if node == "plugin-emulated" else "make plugins")
        return Backend(name, folder, tolerance, skipped=f"{missing[0]} is not built ({how})")
    return Backend(name, folder, tolerance,
                   lambda: ReferencePluginModel.from_pretrained(folder, node=node, verify=False))


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def engine_backends(engines) -> list[Backend]:
    if not engines:
        reason = ("no engine given (mra-export build makes one)" if tensorrt_available()
                  else NO_TENSORRT)
        return [Backend("tensorrt", "-", 0.0, skipped=reason)]
    from ..engines.backend import tensorrt_backend  # run_parity checked TensorRT is here

    return [tensorrt_backend(engine) for engine in engines]
