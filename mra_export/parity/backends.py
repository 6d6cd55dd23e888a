"""Which backends a parity run checks, how to load each, and why any is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from ..engines.manifest import EngineManifest
from ..export.info import ExportInfo
from ..native import CPU_LIBRARY, EMULATED_PLUGIN_LIBRARIES, unbuilt
from ..runtime.ort import (BF16_NOT_ON_CPU, CPU, CUDA, CUDA_FP32, INT8_CPU_ONLY, NO_CUDA_PROVIDER,
                           OrtMraModel, op_library_unavailable)
from ..runtime.plugin_reference import ReferencePluginModel, bf16_unsupported_reason

# Absolute tolerance on every output against the float32 PyTorch model, by the graph's type:
# fp32 for onnxruntime and the CPU references; fp16/bf16 as for TensorRT engines of that type.
# int8: none; its outputs' errors are reported and the task agreement judges it (agreement.py).
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2, "int8": None}
NO_TENSORRT = ("TensorRT is not installed here (pip install -e '.[gpu]' in the mra-export checkout, "
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
        backends = [_node_backend(folder, info.dtype, tolerance, *node)
                    for node in PLUGIN_GRAPH_NODES]
        backends += _onnxruntime_backends(folder, info, tolerance, op_library=True)
    else:
        backends = _onnxruntime_backends(folder, info, tolerance)
    if info.dtype != "fp32":  # an fp32 and an fp16 export of one head, side by side in the table
        for backend in backends:
            backend.name = f"{backend.name} [{info.dtype}]"
    return backends


def _onnxruntime_backends(folder: str, info: ExportInfo, tolerance: float,
                          op_library: bool = False) -> list[Backend]:
    """The export on onnxruntime's CPU and CUDA providers; ``op_library``: a plugin export, its
    MraAttention nodes computed by libmra_attention_ort.so (the C++ twin on the CPU provider, the
    CUDA kernels on CUDA's)."""
    if info.dtype == "int8":
        return _int8_backends(folder)
    suffix = " (MraAttention op)" if op_library else ""
    cpu_reason = (op_library_unavailable(CPU) if op_library else None) or (
        BF16_NOT_ON_CPU if info.dtype == "bf16" else None)
    cuda_reason = (op_library_unavailable(CUDA) if op_library else None) or (
        None if CUDA in ort.get_available_providers() else NO_CUDA_PROVIDER)
    rows = [("onnxruntime-cpu", CPU, cpu_reason), ("onnxruntime-cuda", [CUDA_FP32, CPU], cuda_reason)]
    return [Backend(name + suffix, folder, tolerance, skipped=reason) if reason else
            Backend(name + suffix, folder, tolerance,
                    lambda providers=providers: OrtMraModel.from_pretrained(
                        folder, provider=providers, verify=False))
            for name, providers, reason in rows]


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


def _node_backend(folder: str, dtype: str, tolerance: float, node: str, computed_by: str,
                  libraries, how_to_build: str) -> Backend:
    """The plugin graph run by onnx.reference with its MraAttention nodes computed by ``node``."""
    name = f"plugin graph on CPU (onnx.reference, {computed_by})"
    missing = unbuilt(*libraries)
    if missing:
        return Backend(name, folder, tolerance,
                       skipped=f"{missing[0]} is not built ({how_to_build})")
    reason = bf16_unsupported_reason(dtype)
    if reason:
        return Backend(name, folder, tolerance, skipped=reason)
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
