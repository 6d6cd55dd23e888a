"""``OrtMraModel``: an exported MRA head on onnxruntime, used like a transformers model.

One class serves all six tasks (as Optimum's ``ORTModelFor*`` do per task): ``export.json`` says
the task, its inputs and outputs, and calls return the task's ModelOutput.
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import InputTypeError, UserError, first_line, upgrade_fix
from ..native import ORT_OP_LIBRARY, build_dir, check_interface_version, open_library
from .base import ExportedModel
from .model_io import ModelInputs

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# CUDA without TF32 (which would move results by ~1e-3 against the float32 model), then the CPU.
# onnxruntime's TensorRT provider only when asked for: it builds engines on first use and again
# for each new range of shapes, and TensorRT engines proper are `mra-export build`'s job.
CUDA_FP32 = (CUDA, {"use_tf32": "0"})
PREFERENCE = (CUDA_FP32, CPU)
PROVIDER_OF_DEVICE = {"cuda": CUDA_FP32, "cpu": CPU}  # for .to(device)
ON_GPU = (CUDA, "TensorrtExecutionProvider")
# Where onnxruntime looks for the weights of a graph given as bytes (an edited graph) that keeps
# them in a file of their own (exports over 2 GB).
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
# The first onnxruntime that reads it (1.20.1's library lacks the key and looks in the working
# folder; 1.21.1's has it).
EXTERNAL_DATA_FOLDER_FROM = "1.21"
AS_FLOAT32 = ".as_float32"  # suffix of an output cast to float32 (run_raw strips it)
# Measured with onnxruntime 1.32: no CPU kernel for bfloat16 Add.
BF16_NOT_ON_CPU = ("onnxruntime's CPU provider lacks bfloat16 kernels for this graph; use the "
                   "CUDA provider, TensorRT, or an fp32/fp16 export")
# The provider options that capture a run as a CUDA graph and replay it on the addresses it was
# captured with (onnxruntime's docs: inputs and outputs must stay where they were bound).
CUDA_GRAPH_OPTIONS = ("enable_cuda_graph", "trt_cuda_graph_enable")
CUDA_GRAPHS_REFUSED = ("OrtMraModel binds new inputs and outputs at every call, and a captured "
                       "CUDA graph would replay its first call's addresses, giving wrong results; "
                       "drop the option (for fixed shapes, bind fixed buffers yourself, as "
                       "tools/ort_cuda_speed.py does)")
# Dynamic quantization's int8 kernels (DynamicQuantizeMatMul, uint8 x int8 MatMulInteger) are
# onnxruntime's CPU provider's.
INT8_CPU_ONLY = ("onnxruntime computes its dynamically quantized MatMuls on the CPU provider "
                 "only; use provider='CPUExecutionProvider', or on a GPU the fp32/fp16 export or "
                 "a TensorRT engine")


class OrtMraModel(ExportedModel):
    """An export folder in an onnxruntime session."""

    def __init__(self, info, config, folder, providers, session_options):
        super().__init__(info, config, folder)
        self._providers, self._options = providers, session_options
        self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {}
        self.session = self._session_for(())
        self.check_graph_interface([i.name for i in self.session.get_inputs()],
                                   [o.name.removesuffix(AS_FLOAT32)
                                    for o in self.session.get_outputs()])
        self._check_graph_dtype()

    @classmethod
    def from_pretrained(cls, folder: str | Path, provider: str | list[str] | None = None, *,
                        session_options: ort.SessionOptions | None = None,
                        verify: bool = True) -> OrtMraModel:
        """Load ``folder`` (made by ``mra-export export``), of either flavour.

        ``provider``: an execution provider or a list in order of preference (names or
        ``(name, options)`` pairs); by default CUDA without TF32, then CPU, whichever this
        onnxruntime has (TensorRT's provider only when named). ``verify`` checks the ONNX
        files against the sha256 in ``export.json``. A plugin-flavour export's ``MraAttention``
        nodes run through the op library ``libmra_attention_ort.so`` (``make plugins`` with
        onnxruntime's headers), which this registers in the session options: the C++ twin on the
        CPU provider, the CUDA kernels on the CUDA provider. A bfloat16 export's
        results come back as float32 (numpy has no bfloat16; the widening is exact). An int8
        export (``mra-export quantize``) runs on the CPU provider only. A provider option that
        captures CUDA graphs (``enable_cuda_graph``) is refused: each call binds new buffers.
        """
        if session_options is not None and not isinstance(session_options, ort.SessionOptions):
            raise InputTypeError("session_options must be an onnxruntime.SessionOptions, got "
                                 f"{type(session_options).__name__}")
        info, config = cls.load_export(folder, verify)
        providers = choose_providers(provider, info.dtype)
        options = session_options or default_options()
        if info.flavour == "plugin":
            register_op_library(options)
        return cls(info, config, folder, providers, options)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _compute_on(self, kind: str) -> None:
        """As Optimum's ORTModel.to: "cuda" takes the CUDA provider (one line where this
        onnxruntime lacks it or it will not start, the model then unchanged), "cpu" the CPU's."""
        if kind not in PROVIDER_OF_DEVICE:
            raise UserError(f"onnxruntime computes on cpu or cuda, not on {kind}")
        if ("cuda" if self.providers[0] in ON_GPU else "cpu") == kind:
            return
        providers = choose_providers(PROVIDER_OF_DEVICE[kind], self.info.dtype)
        before = self._providers, self._sessions
        self._providers, self._sessions = providers, {}
        try:
            self.session = self._session_for(())
        except UserError:
            self._providers, self._sessions = before
            raise

    def _check_graph_dtype(self) -> None:
        """export.json's dtype sets parity's tolerance: it must be the graph's (a bfloat16
        graph's outputs are cast to float32 here, so only fp32 and fp16 are told apart)."""
        expected = {"fp32": "tensor(float)", "fp16": "tensor(float16)",
                    "int8": "tensor(float)"}.get(self.info.dtype)  # int8: weights only
        found = {o.type for o in self.session.get_outputs() if o.name in self.info.outputs}
        if expected and found != {expected}:
            raise UserError(f"{self.folder / 'export.json'} says dtype {self.info.dtype}, but "
                            f"{self.info.onnx_file} outputs {', '.join(sorted(found))}; export the "
                            "model again")

    def run_raw(self, arrays: dict[str, np.ndarray], extra_outputs=()) -> dict[str, np.ndarray]:
        session = self._session_for(tuple(extra_outputs))
        names = [o.name for o in session.get_outputs()]
        if session.get_providers()[0] == CUDA:
            values = self._bound_run(session, arrays).copy_outputs_to_cpu()
        else:
            with self._onnxruntime_errors():
                values = session.run(names, arrays)
        return {name.removesuffix(AS_FLOAT32): value for name, value in zip(names, values)}

    def _run_for(self, inputs: ModelInputs) -> dict:
        """CUDA tensors in, on the CUDA provider: the outputs stay on the GPU, handed to torch
        through DLPack (as Optimum's ORTModel binds them), not copied to the host and back
        (a fill-mask head's logits are vocabulary x tokens floats a sample)."""
        session = self._session_for(())
        device = inputs.torch_device
        if device is None or device.type != "cuda" or session.get_providers()[0] != CUDA:
            return super()._run_for(inputs)
        binding = self._bound_run(session, inputs.arrays)
        return {output.name.removesuffix(AS_FLOAT32): tensor_of(value)
                for output, value in zip(session.get_outputs(), binding.get_outputs())}

    def _bound_run(self, session: ort.InferenceSession, arrays) -> ort.IOBinding:
        """One run of ``session`` with its inputs and outputs on the GPU (``device_binding``)."""
        with self._onnxruntime_errors():
            binding = device_binding(session, arrays)
            session.run_with_iobinding(binding)
        return binding

    @contextlib.contextmanager
    def _onnxruntime_errors(self):
        """onnxruntime's failures to run the export, as one line."""
        try:
            yield
        except Exception as error:  # onnxruntime raises its own exception types
            raise UserError(f"onnxruntime failed to run {self.info.onnx_path(self.folder)}: "
                            f"{first_line(error)}") from None

    def _session(self, model: str | bytes) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(model, sess_options=self._options,
                                        providers=self._providers)
        except Exception as error:  # onnxruntime raises its own exception types
            if "Domain already set in registry" in str(error):  # not the model's fault
                raise UserError("session_options already held the MraAttention op library "
                                "(registered elsewhere), and this registers it again; pass new "
                                "SessionOptions, or leave session_options out") from None
            raise UserError(f"onnxruntime cannot load {self.info.onnx_path(self.folder)}: "
                            f"{first_line(error)}") from None

    def _session_for(self, extra_outputs: tuple[str, ...]) -> ort.InferenceSession:
        """The export's session, or one whose graph also outputs ``extra_outputs``
        (intermediate values); a bfloat16 export's outputs are cast to float32 in the graph."""
        if extra_outputs not in self._sessions:
            path = self.info.onnx_path(self.folder)
            if not extra_outputs and self.info.dtype != "bf16":
                self._sessions[extra_outputs] = self._session(str(path))  # the file as it is
            else:
                self._sessions[extra_outputs] = self._edited_session(path, extra_outputs)
        return self._sessions[extra_outputs]

    def _edited_session(self, path: Path, extra_outputs: tuple[str, ...]) -> ort.InferenceSession:
        model = onnx.load(str(path), load_external_data=False)
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name)
                                  for name in extra_outputs)
        if self.info.dtype == "bf16":
            cast_outputs_to_float32(model.graph)
        if self.info.external_data:  # the graph goes from memory, its weights stay in the folder
            fix = upgrade_fix("onnxruntime", ort.__version__, EXTERNAL_DATA_FOLDER_FROM)
            if fix:
                raise UserError(f"onnxruntime {ort.__version__} cannot find the weights of "
                                f"{path} from an edited copy of its graph (extra outputs, or "
                                f"bfloat16); {fix}")
            self._options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(path.parent))
        return self._session(model.SerializeToString())


def device_binding(session: ort.InferenceSession, arrays: dict[str, np.ndarray],
                   device: str = "cuda") -> ort.IOBinding:
    """``session``'s I/O binding with ``arrays`` copied to ``device`` ("cuda" or "cpu") once
    and every output left there: ``session.run_with_iobinding(binding)`` then runs the graph
    alone, neither copying inputs from the host nor results back (onnxruntime's docs, "I/O
    Binding"); by default onnxruntime still synchronizes its stream before the run returns."""
    binding = session.io_binding()
    for name, array in arrays.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device, 0)
    return binding


def tensor_of(value: ort.OrtValue) -> torch.Tensor:
    """``value`` as a torch tensor on its own device, sharing its memory (DLPack), or through
    the host where this onnxruntime's OrtValue has no DLPack."""
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    return torch.from_numpy(value.numpy())


def choose_providers(provider, dtype: str = "fp32") -> list:
    """The providers to ask onnxruntime for, checked against what it has and the export's
    dtype (every flavour runs on each provider: the plugin flavour's nodes through the op
    library).
    ``provider`` is a name, or a list of names and ``(name, options)`` pairs as onnxruntime
    takes them."""
    available = ort.get_available_providers()
    if provider is None:
        preference = (CPU,) if dtype == "int8" else PREFERENCE
        wanted = [p for p in preference if _provider_name(p) in available]
    elif _is_provider(provider):
        wanted = [provider]
    elif isinstance(provider, (list, tuple)) and all(map(_is_provider, provider)):
        wanted = list(provider)
    else:
        raise UserError(f"provider must be an execution provider's name, a (name, options) pair, "
                        f"or a list of them, got {provider!r}")
    if dtype == "int8" and any(_provider_name(p) in ON_GPU for p in wanted):
        raise UserError(f"this export is int8: {INT8_CPU_ONLY}")
    capturing = _cuda_graph_option(wanted)
    if capturing:
        name, option = capturing
        raise UserError(f"{name}'s {option}: {CUDA_GRAPHS_REFUSED}")
    missing = [name for name in map(_provider_name, wanted) if name not in available]
    if missing:
        raise UserError(f"{', '.join(missing)} is not available in this onnxruntime "
                        f"(available: {', '.join(available)}); for CUDA or TensorRT install "
                        "onnxruntime-gpu (pip install -e '.[gpu]' in the mra-export checkout)")
    if dtype == "bf16" and wanted and _provider_name(wanted[0]) == CPU:
        raise UserError(f"this export is bfloat16: {BF16_NOT_ON_CPU}")
    return wanted


# Session options the op library is registered in: onnxruntime refuses the domain a second time.
_OPTIONS_WITH_OP_LIBRARY: weakref.WeakSet = weakref.WeakSet()
OP_LIBRARY_HOW_TO_BUILD = ("make plugins ORT_INCLUDE_DIR=<folder holding onnxruntime_c_api.h, "
                           "onnxruntime 1.20 or later>")


def op_library_path() -> Path:
    """``libmra_attention_ort.so``, which runs the plugin flavour's ``MraAttention`` nodes in
    onnxruntime, or a one-line error saying how to build it."""
    path = build_dir() / ORT_OP_LIBRARY
    if not path.is_file():
        raise UserError(f"{path} is not built, and onnxruntime runs the plugin flavour's "
                        f"MraAttention nodes through it: run '{OP_LIBRARY_HOW_TO_BUILD}'")
    check_interface_version(path)
    return path


def register_op_library(options: ort.SessionOptions) -> None:
    """Register the op library in ``options`` (once per options object)."""
    if options in _OPTIONS_WITH_OP_LIBRARY:
        return
    path = op_library_path()
    try:
        options.register_custom_ops_library(str(path))
    except Exception as error:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime {ort.__version__} cannot load {path} ({first_line(error)}); "
                        f"it needs onnxruntime 1.20 or later, and rebuilding it with "
                        f"'{OP_LIBRARY_HOW_TO_BUILD}' may help") from None
    _OPTIONS_WITH_OP_LIBRARY.add(options)


NO_CUDA_PROVIDER = ("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu "
                    "on an NVIDIA machine)")


def op_library_unavailable(provider: str) -> str | None:
    """Why the op library cannot compute MraAttention nodes on ``provider`` here, or None."""
    if not (build_dir() / ORT_OP_LIBRARY).is_file():
        return f"{build_dir() / ORT_OP_LIBRARY} is not built ({OP_LIBRARY_HOW_TO_BUILD})"
    if provider == CUDA and CUDA not in ort.get_available_providers():
        return NO_CUDA_PROVIDER
    if provider == CUDA and not op_library_has_cuda_kernel():
        return f"{ORT_OP_LIBRARY} was built without its CUDA kernel (no nvcc where 'make plugins' ran)"
    return None


def op_library_has_cuda_kernel() -> bool:
    """Whether the op library holds its CUDA kernel (built where nvcc was found)."""
    return hasattr(open_library(op_library_path()), "mraAttentionCuda")


def cast_outputs_to_float32(graph: onnx.GraphProto) -> None:
    """Replace each output ``X`` by ``Cast(X) -> X + AS_FLOAT32``: onnxruntime's Python API
    returns results as numpy arrays, and numpy has no bfloat16."""
    outputs = list(graph.output)
    del graph.output[:]
    for output in outputs:
        widened = output.name + AS_FLOAT32
        graph.node.append(onnx.helper.make_node("Cast", [output.name], [widened],
                                                to=onnx.TensorProto.FLOAT))
        graph.output.append(onnx.helper.make_tensor_value_info(widened, onnx.TensorProto.FLOAT,
                                                               None))


def _cuda_graph_option(providers) -> tuple[str, str] | None:
    """The first (provider, option) whose option turns on CUDA-graph capture, or None."""
    return next(((provider[0], option) for provider in providers if isinstance(provider, tuple)
                 for option in CUDA_GRAPH_OPTIONS
                 if str(provider[1].get(option, "0")).strip().lower() not in ("0", "false", "")),
                None)


def _is_provider(provider) -> bool:
    return isinstance(provider, str) or (isinstance(provider, tuple) and len(provider) == 2
                                         and isinstance(provider[0], str)
                                         and isinstance(provider[1], dict))


def _provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


THREADS_VARIABLE = "MRA_EXPORT_ORT_THREADS"
MAX_THREADS_PER_CORE = 4  # past that, threads only wait for each other (and spawn for seconds)


def default_options() -> ort.SessionOptions:
    """Full graph optimisation; no memory patterns; intra-op threads as onnxruntime chooses (one
    per core) unless ``MRA_EXPORT_ORT_THREADS`` says otherwise.

    Memory patterns are planned per input shape, and every batch and length is a new shape for a
    model served with dynamic axes, so each would keep its own plan. For this graph they brought
    nothing measurable in a one-off check (not a committed tool): 285 vs 281 ms and the same
    421 MB peak at 4096 tokens, one mra-base layer, 2 CPUs, onnxruntime 1.32, 15 runs each.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    threads = threads_from_environment()
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def threads_from_environment() -> int | None:
    """``MRA_EXPORT_ORT_THREADS`` as onnxruntime's intra-op threads (0: one per core), None where
    it is not set; the CLI checks it before any work, so that a typo is not a failed backend."""
    threads = os.environ.get(THREADS_VARIABLE, "").strip()
    if not threads:
        return None
    if not re.fullmatch("[0-9]+", threads):  # str.isdigit takes "²", which int() does not
        raise UserError(f"{THREADS_VARIABLE} must be a number of threads (0: one per core), got "
                        f"{threads!r}")
    count, most = int(threads), MAX_THREADS_PER_CORE * (os.cpu_count() or 1)
    if count > most:
        raise UserError(f"{THREADS_VARIABLE}={threads} is more threads than this machine's "
                        f"{os.cpu_count()} cores can use; set at most {most} (0: one per core)")
    return count
