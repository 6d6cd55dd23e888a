"""Which backends a parity run checks, how to load each, and why any is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from ..export.info import ExportInfo
from ..native import CPU_LIBRARY, EMULATED_PLUGIN_LIBRARIES, unbuilt
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
        backends = [_node_backend(folder, tolerance, *node) for node in PLUGIN_GRAPH_NODES]
    else:
        backends = _onnxruntime_backends(folder, info, tolerance)
    if info.dtype != "fp32":  # an fp32 and an fp16 export of one head, side by side in the table
        for backend in backends:
            backend.name = f"{backend.name} [{info.dtype}]"
    return backends


def _onnxruntime_backends(folder: str, info: ExportInfo, tolerance: float) -> list[Backend]:
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


# How the plugin graph's MraAttention nodes are computed on the CPU: the ReferencePluginModel
# node, its name in the report, the libraries it needs and how to build them.
PLUGIN_GRAPH_NODES = (
    ("torch", "PyTorch node", (), ""),
    ("cpp", "C++ plugin twin", (CPU_LIBRARY,), "make plugins"),
    ("plugin-emulated", "plugin on emulated CUDA", EMULATED_PLUGIN_LIBRARIES,
     "make plugins TensorRT_ROOT=<folder with TensorRT's include/>"),
)


def _node_backend(folder: str, tolerance: float, node: str, computed_by: str, libraries,
                  how_to_build: str) -> Backend:
    """The plugin graph run by onnx.reference with its MraAttention nodes computed by ``node``."""
    name = f"plugin graph on CPU (onnx.reference, {computed_by})"
    missing = unbuilt(*libraries)
    if missing:
        return Backend(name, folder, tolerance,
                       skipped=f"{missing[0]} is not built ({how_to_build})")
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
