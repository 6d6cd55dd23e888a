"""Which backends a parity run checks, how to load each, and why any is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from ..engines.manifest import EngineManifest
from ..export.info import ExportInfo
from ..native import CPU_LIBRARY, EMULATED_PLUGIN_LIBRARIES, ORT_OP_LIBRARY, unbuilt
from ..runtime.ort import (BF16_NOT_ON_CPU, CPU, CUDA, CUDA_FP32, INT8_CPU_ONLY,
                           OP_LIBRARY_HOW_TO_BUILD, OrtMraModel, op_library_has_cuda_kernel)
from ..runtime.plugin_reference import ReferencePluginModel

# Absolute tolerance on every output against the float32 PyTorch model, by the graph's type:
# fp32 for onnxruntime and the CPU references; fp16/bf16 as for TensorRT engines of that type.
# int8: none; its outputs' errors are reported and the task agreement judges it (agreement.py).
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2, "int8": None}
NO_TENSORRT = ("TensorRT is not installed here (pip install 'mra-export[gpu]' on an NVIDIA "
               "machine)")
NO_CUDA_PROVIDER = ("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu "
                    "on an NVIDIA machine)")


@dataclasses.dataclass
class Backend:
    name: str
    source: str
    tolerance: float | None  # None: outputs reported, not judged by it (int8)
    load: Callable | None = None  # -> ExportedModel
    skipped: str | None = None
    attention: bool = True  # whether it can output the attention contexts
    no_attention: str = "the engine has no attention outputs (build with --attention-outputs)"
    agreement: bool = False  # judged by the task's agreement with PyTorch (int8)


def export_backends(folder: str | Path) -> list[Backend]:
    """The backends that run an export folder whose files run_parity has verified (the loaders
    do not hash them again)."""
    folder = str(folder)
    info = ExportInfo.load(folder)
    tolerance = TOLERANCES[info.dtype]
    if info.flavour == "plugin":
        backends = [_node_backend(folder, tolerance, *node) for node in PLUGIN_GRAPH_NODES]
        backends += _op_library_backends(folder, info, tolerance)
    else:
        backends = _onnxruntime_backends(folder, info, tolerance)
    if info.dtype != "fp32":  # an fp32 and an fp16 export of one head, side by side in the table
        for backend in backends:
            backend.name = f"{backend.name} [{info.dtype}]"
    return backends


def _onnxruntime_backends(folder: str, info: ExportInfo, tolerance: float) -> list[Backend]:
    if info.dtype == "int8":
        return _int8_backends(folder)
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
        backends.append(Backend("onnxruntime-cuda", folder, tolerance, skipped=NO_CUDA_PROVIDER))
    return backends


def _op_library_backends(folder: str, info: ExportInfo, tolerance: float) -> list[Backend]:
    """The plugin graph itself on onnxruntime, its MraAttention nodes computed by the op library
    (libmra_attention_ort.so): the C++ twin on the CPU provider, the CUDA kernels on CUDA's."""
    cpu, cuda = "onnxruntime-cpu (MraAttention op)", "onnxruntime-cuda (MraAttention op)"
    missing = unbuilt(ORT_OP_LIBRARY)
    if missing:
        reason = f"{missing[0]} is not built ({OP_LIBRARY_HOW_TO_BUILD})"
        return [Backend(cpu, folder, tolerance, skipped=reason),
                Backend(cuda, folder, tolerance, skipped=reason)]
    backends = [Backend(cpu, folder, tolerance, skipped=BF16_NOT_ON_CPU) if info.dtype == "bf16"
                else Backend(cpu, folder, tolerance, lambda: OrtMraModel.from_pretrained(
                    folder, provider=CPU, verify=False))]
    if CUDA not in ort.get_available_providers():
        backends.append(Backend(cuda, folder, tolerance, skipped=NO_CUDA_PROVIDER))
    elif not op_library_has_cuda_kernel():
        backends.append(Backend(cuda, folder, tolerance, skipped=(
            f"{ORT_OP_LIBRARY} was built without its CUDA kernel (no nvcc where 'make plugins' "
            "ran)")))
    else:
        providers = [CUDA_FP32, CPU]
        backends.append(Backend(cuda, folder, tolerance, lambda: OrtMraModel.from_pretrained(
            folder, provider=providers, verify=False)))
    return backends


def _int8_backends(folder: str) -> list[Backend]:
    """An int8 export on onnxruntime's CPU provider, judged by task agreement: its projections
    move every attention context by design, so the per-head diagnostic is not run."""
    cpu = Backend("onnxruntime-cpu", folder, None,
                  lambda: OrtMraModel.from_pretrained(folder, provider=CPU, verify=False),
                  attention=False, agreement=True,
                  no_attention="int8 projections move the attention contexts by design; the task "
                               "agreement judges the outputs")
    return [cpu, Backend("onnxruntime-cuda", folder, None, skipped=INT8_CPU_ONLY)]


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
    return [tensorrt_backend(engine) for engine in engines]


# Absolute tolerances on every output of an engine against the float32 PyTorch model (issue 5:
# logits), by the engine's precision.
ENGINE_TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def tensorrt_backend(folder: str | Path) -> Backend:
    """The engine in ``folder``, which run_parity has checked fits this machine (the loader
    does not hash it again)."""
    from ..runtime.trt import TrtMraModel  # run_parity checked TensorRT is here

    manifest = EngineManifest.load(folder)
    return Backend(f"tensorrt-{manifest.precision}", str(folder),
                   ENGINE_TOLERANCES[manifest.precision],
                   load=lambda: TrtMraModel.from_engine(folder, verify=False),
                   attention=manifest.attention_outputs)
