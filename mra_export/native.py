"""The C interface of ``plugins/mra_attention/mraAttention.h``, through ctypes.

Three libraries export it: ``libmra_attention_cpu.so`` (the CPU reference),
``libmra_attention_cuda.so`` (the CUDA kernels) and ``libmra_attention_cuda_emulated.so`` (the
CUDA kernels' source compiled for the CPU under ``plugins/tests/cuda_emulation``, so that CI runs
their logic on host memory). ``PluginRunner`` drives the TensorRT plugin itself, built over those
emulated kernels, through TensorRT's plugin interfaces. ``make plugins`` builds them into
``plugins/build``; ``MRA_EXPORT_PLUGIN_BUILD`` points elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import subprocess
from pathlib import Path

import torch
from filelock import FileLock

from .errors import InputError, UserError, first_line
from .fenced_memory import SIDES, FencedBuffers, check_side

BUILD_DIR = Path(__file__).resolve().parent.parent / "plugins" / "build"
BUILD_DIR_VARIABLE = "MRA_EXPORT_PLUGIN_BUILD"  # another build folder than BUILD_DIR
GPU_CHECK_BUILD_DIR = BUILD_DIR.parent / "build-gpu"  # tools/gpu_check.py's, for its GPU alone
CPU_LIBRARY = "libmra_attention_cpu.so"
CUDA_LIBRARY = "libmra_attention_cuda.so"
CUDA_EMULATED_LIBRARY = "libmra_attention_cuda_emulated.so"
PLUGIN_LIBRARY = "libmra_attention_plugin.so"
PLUGIN_EMULATED_LIBRARY = "libmra_attention_plugin_emulated.so"  # the plugin over emulated kernels
# Registers PLUGIN_LIBRARY's creator when opened after TensorRT's runtime: what Triton's tensorrt
# backend, which only dlopens plugin libraries, is given (serving/triton.py); its emulated twin.
TRITON_PLUGIN_LIBRARY = "libmra_attention_plugin_triton.so"
TRITON_PLUGIN_EMULATED_LIBRARY = "libmra_attention_plugin_triton_emulated.so"
PLUGIN_RUNNER_LIBRARY = "libmra_attention_plugin_runner.so"  # drives a plugin as TensorRT does
PLUGIN_RUNNER_CUDA_LIBRARY = "libmra_attention_plugin_runner_cuda.so"  # the same, on a GPU
EMULATED_PLUGIN_LIBRARIES = (PLUGIN_EMULATED_LIBRARY, PLUGIN_RUNNER_LIBRARY)  # PluginRunner.emulated
ORT_OP_LIBRARY = "libmra_attention_ort.so"  # MraAttention for onnxruntime (runtime/ort.py loads it)

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODES = {"full": 0, "sparse": 1}
# MraLayout: how query, key, value and the output lie in memory (their shape is [B, H, S, D]).
LAYOUTS = {"bhsd": 0, "bshd": 1}
STATUS_OK = 0


def ensure_built(file_name: str, target: str) -> Path:
    """``build_dir() / file_name``, built first with CMake's ``target`` if it is missing (what
    tests and tools do where `make plugins` has not run); a failed build is one UserError
    carrying CMake's output."""
    path = build_dir() / file_name
    if path.is_file():
        return path
    build_dir().mkdir(parents=True, exist_ok=True)
    # One build at a time in the folder (pytest-xdist's workers, tools started together): two
    # CMake runs there would race, and a library still being linked would load half-written.
    with FileLock(build_dir() / ".ensure_built.lock"):
        if not path.is_file():
            for command in (["cmake", "-S", str(BUILD_DIR.parent), "-B", str(build_dir())],
                            ["cmake", "--build", str(build_dir()), "--target", target]):
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise UserError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return path


def unbuilt(*names: str) -> list[Path]:
    """The paths of those ``names`` that are not in ``build_dir()`` (not made, or skipped by
    ``make plugins`` for want of nvcc or TensorRT's headers)."""
    return [build_dir() / name for name in names if not (build_dir() / name).is_file()]


_FOUND: set[tuple[str | None, str]] = set()  # (MRA_EXPORT_PLUGIN_BUILD, library) found built


def is_built(name: str) -> bool:
    """Whether ``build_dir()`` has the library ``name``. A library found once is not looked for
    again (a stat per call cost microseconds of every layer's attention); one not found is."""
    found = (os.environ.get(BUILD_DIR_VARIABLE), name)
    if found not in _FOUND:
        if not (build_dir() / name).is_file():
            return False
        _FOUND.add(found)
    return True


def c_inputs(query, key, value, mask, layout: str = "bhsd") -> tuple[torch.Tensor, ...]:
    """Q, K, V and the mask as the C interfaces read them: Q, K, V laid out as ``layout`` says,
    the mask contiguous int32 0/1."""
    query, key, value = (in_layout(t, layout) for t in (query, key, value))
    return query, key, value, (mask != 0).to(torch.int32).contiguous()


def fenced_inputs(fenced: FencedBuffers, query, key, value, mask) -> tuple[torch.Tensor, ...]:
    """``c_inputs``' tensors copied into ``fenced``: Q, K and V 16-byte aligned (they move in
    16-byte vectors), the int32 mask 4-byte aligned (read as such)."""
    return (*(fenced.copy(name, tensor) for name, tensor in
              (("query", query), ("key", key), ("value", value))),
            fenced.copy("mask", mask, alignment=4))


class MraAttentionParams(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "batch", "heads", "seq_len", "head_dim", "num_blocks", "block_size", "approx_mode",
        "initial_prior_first_n_blocks", "initial_prior_diagonal_n_blocks", "dtype", "layout")]


def make_params(shape, dtype: torch.dtype, *, num_blocks: int, approx_mode: str = "full",
                block_size: int = 32, initial_prior_first_n_blocks: int = 0,
                initial_prior_diagonal_n_blocks: int = 0, layout: str = "bhsd") -> MraAttentionParams:
    """The C interface's parameters of a call on ``[B, H, S, D]`` = ``shape`` tensors."""
    batch, heads, seq_len, head_dim = shape
    return MraAttentionParams(batch, heads, seq_len, head_dim, num_blocks, block_size,
                              MODES[approx_mode], initial_prior_first_n_blocks,
                              initial_prior_diagonal_n_blocks, DTYPES[dtype], LAYOUTS[layout])


def in_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A ``[B, H, S, D]`` tensor laid out in memory as ``layout`` says (a copy unless it is)."""
    if layout == "bshd":
        return tensor.transpose(1, 2).contiguous().transpose(1, 2)
    return tensor.contiguous()


def empty_in_layout(shape, layout: str, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[B, H, S, D]`` tensor of ``like``'s dtype and device, laid out as
    ``layout`` says."""
    batch, heads, seq_len, head_dim = shape
    if layout == "bshd":
        return like.new_empty(batch, seq_len, heads, head_dim).transpose(1, 2)
    return like.new_empty(batch, heads, seq_len, head_dim)


def build_dir() -> Path:
    return Path(os.environ.get(BUILD_DIR_VARIABLE, BUILD_DIR))


def library_path(name: str) -> Path:
    """Where ``make plugins`` puts a library, or a one-line error saying how to build it."""
    path = build_dir() / name
    if not path.is_file():
        raise UserError(f"{path} is not built; run 'make plugins' (it needs cmake and a C++ "
                        "compiler; nvcc for the CUDA kernels, TensorRT headers for the plugin)")
    return path


def open_library(path: str | Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:  # not a library, another architecture, a missing dependency
        raise UserError(f"cannot load {path} ({first_line(error)}); rebuild it with 'make "
                        "plugins'") from None


# MRA_ATTENTION_INTERFACE_VERSION of mraAttention.h: 2 since MraAttentionParams.layout and the
# node's layout attribute, which a library built before reads past or ignores.
INTERFACE_VERSION = 2


def check_interface_version(path: str | Path, lib: ctypes.CDLL | None = None) -> None:
    """Refuse, in one line, a library of the kernel library's family (the CPU twin, the kernels,
    the onnxruntime op, the TensorRT plugin) built from another version of mra-export: it would
    compute silently wrong results. A file that is no shared library at all is left to its
    loader (onnxruntime, TensorRT), which says so in its own words."""
    if lib is None:
        with open(path, "rb") as file:
            if file.read(4) != b"\x7fELF":
                return
        lib = open_library(path)
    built = lib.mraInterfaceVersion() if hasattr(lib, "mraInterfaceVersion") else 1  # 1: none
    if built != INTERFACE_VERSION:
        raise UserError(f"{path} was built from another version of mra-export (its C interface "
                        f"is version {built}, this mra-export's is {INTERFACE_VERSION}); rebuild "
                        "it with 'make plugins'")


class MraLibrary:
    """One of the libraries exporting ``mraAttention.h``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lib = open_library(self.path)
        check_interface_version(self.path, self.lib)
        params = ctypes.POINTER(MraAttentionParams)
        self.lib.mraWorkspaceSize.argtypes = [params]
        self.lib.mraWorkspaceSize.restype = ctypes.c_size_t
        self.lib.mraSelectedBlocksPerHead.argtypes = [params]
        self.lib.mraSelectedBlocksPerHead.restype = ctypes.c_int32
        self.lib.mraSelectedBlocks.argtypes = [params, ctypes.c_void_p]
        self.lib.mraSelectedBlocks.restype = ctypes.c_void_p
        self.lib.mraStatusString.argtypes = [ctypes.c_int]
        self.lib.mraStatusString.restype = ctypes.c_char_p
        self.lib.mraCheckParams.argtypes = [params]
        # Q, K, V, the mask, the output and the workspace, then its size (and a stream).
        tensors_and_size = [params, *[ctypes.c_void_p] * 6, ctypes.c_size_t]
        if hasattr(self.lib, "mraAttentionCpu"):
            self.lib.mraAttentionCpu.argtypes = tensors_and_size
        if hasattr(self.lib, "mraAttentionCuda"):
            self.lib.mraAttentionCuda.argtypes = [*tensors_and_size, ctypes.c_void_p]
        # The emulated kernels take host pointers through the CUDA entry point.
        self.emulated = hasattr(self.lib, "mraCudaEmulationSetSchedule")
        self.fence = "after"  # the emulated kernels' buffers: fenced after their end (set_fence)
        for counter in ("mraCudaEmulationTakeLargestCluster", "mraCudaEmulationLastLaunchThreads"):
            if hasattr(self.lib, counter):
                getattr(self.lib, counter).restype = ctypes.c_uint32

    @classmethod
    @functools.cache
    def cpu(cls) -> MraLibrary:
        return cls(library_path(CPU_LIBRARY))

    @classmethod
    def cuda(cls) -> MraLibrary:
        return cls(library_path(CUDA_LIBRARY))

    def set_schedule(self, schedule: int) -> None:
        """The emulated kernels' schedule: lowest thread first (0), highest first (1), else
        random with that seed (CTAs likewise)."""
        self.lib.mraCudaEmulationSetSchedule(ctypes.c_uint32(schedule))

    def set_fence(self, side: str) -> None:
        """Where the emulated kernels' buffers meet an unmapped page: "after" their end (reads
        and writes past it fault) or "before" their start."""
        self.fence = check_side(side)

    def set_multiprocessors(self, count: int) -> None:
        """The SMs the emulated GPU reports (132 at first): the selection splits a row over as
        many CTAs as the rows leave SMs for, up to 8."""
        self.lib.mraCudaEmulationSetMultiprocessors(ctypes.c_uint32(count))

    def take_largest_cluster(self) -> int:
        """CTAs in the largest cluster the emulated kernels launched since the last call (1:
        no clusters, 0: no launch)."""
        return self._emulation_counter("mraCudaEmulationTakeLargestCluster")

    def last_launch_threads(self) -> int:
        """Threads per CTA of the emulated kernels' last launch (0: none yet): after an
        attention, its high-resolution kernel's."""
        return self._emulation_counter("mraCudaEmulationLastLaunchThreads")

    def _emulation_counter(self, name: str) -> int:
        """What the emulated library's test counter ``name`` returns; a one-line error where
        the library is older than the counter (or not the emulation)."""
        if not hasattr(self.lib, name):
            raise UserError(f"{self.path.name} has no {name}; rebuild it with 'make plugins'")
        return getattr(self.lib, name)()

    @staticmethod
    def params(query: torch.Tensor, **settings) -> MraAttentionParams:
        """``make_params`` for ``query``'s shape and dtype."""
        return make_params(query.shape, query.dtype, **settings)

    def attention(self, query, key, value, mask, layout: str = "bhsd", **settings):
        """MRA attention of ``[B, H, S, D]`` tensors on the library's device; returns
        ``(output, selected blocks [B * H, k])``. Tensors must be on the CPU for the CPU library
        and the emulated kernels, and on one CUDA device for the CUDA one, where the kernels run
        on that device's current stream. ``layout``: how the library sees them in memory."""
        devices = {t.device for t in (query, key, value, mask)}
        if len(devices) != 1:
            raise InputError(f"query, key, value and mask must be on one device, got "
                             f"{', '.join(sorted(map(str, devices)))}")
        if self.emulated and query.is_cuda:
            raise InputError(f"{self.path.name} runs the kernels on the CPU: pass CPU tensors")
        params = self.params(query, layout=layout, **settings)
        output, workspace = self.run(params, *c_inputs(query, key, value, mask, layout))
        return output, self._selected(params, workspace)

    def workspace_size(self, params: MraAttentionParams) -> int:
        """The workspace bytes of a call with ``params``, once the library has accepted them (a
        one-line error where it does not)."""
        self.check(self.lib.mraCheckParams(ctypes.byref(params)))
        return self.lib.mraWorkspaceSize(ctypes.byref(params))

    def run(self, params: MraAttentionParams, query, key, value, mask,
            workspace_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of the library on tensors the caller has checked (laid out as
        ``params.layout`` says, one device, one dtype, an int32 mask); returns ``(output,
        workspace)``, the output in the same layout. ``workspace_size``: ``workspace_size(params)``
        where the caller has it already. The workspace comes from PyTorch's allocator (for the
        emulated kernels, every buffer from fenced memory); on CUDA everything is queued on the
        current stream, no sync."""
        if workspace_size is None:
            workspace_size = self.workspace_size(params)
        if self.emulated:
            return self._run_emulated(params, query, key, value, mask, workspace_size)
        output = torch.empty_like(query)  # dense query: its strides, so laid out as it is
        workspace = torch.empty(workspace_size, dtype=torch.uint8, device=query.device)
        pointers = [t.data_ptr() for t in (query, key, value, mask, output, workspace)]
        if query.is_cuda:
            status = self._run_cuda(params, pointers, workspace_size, query.device)
        else:
            status = self.lib.mraAttentionCpu(ctypes.byref(params), *pointers, workspace_size)
        self.check(status)
        return output, workspace

    def _run_emulated(self, params, query, key, value, mask, workspace_size: int):
        """``run`` for the emulated kernels, on fenced memory (``fenced_memory``): every buffer
        exactly its size against an unmapped page on ``self.fence``'s side, so a global read or
        write outside it faults, as compute-sanitizer's memcheck reports one; the output and
        workspace start as garbage (0xff, NaN as float), so an unwritten element shows. Inside
        the workspace, the library fences each section likewise, on the same side
        (plugins/tests/cuda_emulation/fencedWorkspace.cpp); it wants the workspace on a page."""
        self.lib.mraCudaEmulationSetWorkspaceFence(ctypes.c_uint32(SIDES.index(self.fence)))
        fenced = FencedBuffers(self.fence)
        query, key, value, mask = fenced_inputs(fenced, query, key, value, mask)
        output = fenced.empty_like("output", query)
        workspace = fenced.empty("workspace", torch.uint8, (workspace_size,), alignment=mmap.PAGESIZE)
        pointers = [t.data_ptr() for t in (query, key, value, mask, output, workspace)]
        self.check(self.lib.mraAttentionCuda(ctypes.byref(params), *pointers, workspace_size, None))
        fenced.check(self.path.name)
        return output, workspace

    def _run_cuda(self, params, pointers, workspace_size: int, device: torch.device) -> int:
        """The kernels queued on ``device``'s current stream; they launch on the current device,
        so it is switched to ``device`` only where it is another (the switch costs microseconds
        a call)."""
        if device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return self._run_cuda(params, pointers, workspace_size, device)
        stream = torch.cuda.current_stream(device).cuda_stream
        return self.lib.mraAttentionCuda(ctypes.byref(params), *pointers, workspace_size, stream)

    def set_cpu_threads(self, threads: int) -> None:
        """Threads of ``mraAttentionCpu`` (0: one per hardware thread); process-wide."""
        self.lib.mraSetCpuThreads(ctypes.c_int32(threads))

    def _selected(self, params, workspace: torch.Tensor) -> torch.Tensor:
        count = params.batch * params.heads * self.lib.mraSelectedBlocksPerHead(ctypes.byref(params))
        start = self.lib.mraSelectedBlocks(ctypes.byref(params),
                                           ctypes.c_void_p(workspace.data_ptr()))
        offset = start - workspace.data_ptr()
        blocks = workspace[offset:offset + 4 * count].view(torch.int32)
        return blocks.reshape(params.batch * params.heads, -1).clone()

    def check(self, status: int) -> None:
        if status != STATUS_OK:
            message = self.lib.mraStatusString(status).decode()
            if status == 4 and hasattr(self.lib, "mraLastCudaError"):
                self.lib.mraLastCudaError.restype = ctypes.c_char_p
                message += ": " + self.lib.mraLastCudaError().decode()
                if "no kernel image" in message:  # built for other GPUs: a fixable setup
                    raise UserError(f"{self.path}: {message}; it was built for other CUDA "
                                    "architectures: rebuild it with 'make plugins "
                                    "MRA_CUDA_ARCHITECTURES=<this GPU's, e.g. 90>'")
            raise RuntimeError(f"{self.path.name}: {message}")


class PluginRunner:
    """The ``MraAttention`` TensorRT plugin of ``plugin_library`` run as TensorRT runs it, on host
    memory: ``plugins/tests/pluginRunner.cpp`` gives it an ONNX node's attributes as the parser
    does, builds it for a profile, recreates it from its serialised fields, and enqueues. With
    the plugin built over the emulated kernels (``PLUGIN_EMULATED_LIBRARY``) this is the whole
    plugin, fields to output, without TensorRT's libraries or a GPU."""

    def __init__(self, plugin_library: str | Path, runner_library: str | Path):
        self.plugin_library = Path(plugin_library)
        check_interface_version(self.plugin_library)
        self.lib = open_library(runner_library)
        pointer, shape = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
        strings = ctypes.POINTER(ctypes.c_char_p)
        self.lib.mraPluginRun.argtypes = [ctypes.c_char_p, ctypes.c_int32, strings, strings, shape,
                                          ctypes.c_int32, shape, shape, shape, shape, pointer,
                                          pointer, pointer, pointer, pointer, ctypes.c_char_p,
                                          ctypes.c_size_t]
        self.lib.mraPluginRun.restype = ctypes.c_int32

    @classmethod
    @functools.cache
    def emulated(cls) -> PluginRunner:
        """The plugin over the emulated kernels (``make plugins`` with TensorRT's headers)."""
        return cls(library_path(PLUGIN_EMULATED_LIBRARY), library_path(PLUGIN_RUNNER_LIBRARY))

    @classmethod
    @functools.cache
    def cuda(cls) -> PluginRunner:
        """The real plugin (the CUDA kernels) on the GPU: the runner copies the CPU tensors into
        device memory, enqueues on a stream of its own and copies the output back (``make
        plugins`` with nvcc and TensorRT's headers)."""
        return cls(library_path(PLUGIN_LIBRARY), library_path(PLUGIN_RUNNER_CUDA_LIBRARY))

    def attention(self, query, key, value, mask, *, profile_max: tuple[int, int] | None = None,
                  **attributes) -> torch.Tensor:
        """The plugin's output for ``[B, H, S, D]`` CPU tensors (``[B, S, H, D]`` with the
        attribute ``layout="bshd"``) and a ``[B, S]`` mask. ``attributes`` are the node's
        (``num_blocks``, ``approx_mode``, ...: an int or a str each). The engine's profile spans
        batch 1..B' and sequence 1..S' with ``profile_max = (B', S')``, twice the input's by
        default (the plugin sizes its workspace for the maxima and runs at the input's shape)."""
        token_major = attributes.get("layout") == "bshd"
        if token_major:
            batch, seq_len, heads, head_dim = query.shape
        else:
            batch, heads, seq_len, head_dim = query.shape

        def node_shape(batch, seq_len):
            return (batch, seq_len, heads, head_dim) if token_major else (batch, heads, seq_len, head_dim)

        high_batch, high_seq = profile_max or (2 * batch, 2 * seq_len)
        low = node_shape(1, 1)  # also the profile's opt: the workspace is not sized by it
        shapes = [node_shape(batch, seq_len), low, low, node_shape(high_batch, high_seq)]
        names = [name.encode() for name in attributes]
        texts = [v.encode() if isinstance(v, str) else None for v in attributes.values()]
        numbers = [0 if isinstance(v, str) else int(v) for v in attributes.values()]
        # Fenced as the emulated kernels' own calls are (MraLibrary._run_emulated); the
        # workspace is the runner's, fenced likewise (plugins/tests/guardedBuffer.h).
        fenced = FencedBuffers()
        query, key, value, mask = fenced_inputs(fenced, *c_inputs(query, key, value, mask))
        output = fenced.empty_like("output", query)  # 0xff: unwritten outputs show
        error = ctypes.create_string_buffer(2048)
        status = self.lib.mraPluginRun(
            str(self.plugin_library).encode(), len(names), (ctypes.c_char_p * len(names))(*names),
            (ctypes.c_char_p * len(texts))(*texts), (ctypes.c_int64 * len(numbers))(*numbers),
            DTYPES[query.dtype], *[(ctypes.c_int64 * 4)(*shape) for shape in shapes],
            *[ctypes.c_void_p(t.data_ptr()) for t in (query, key, value, mask, output)],
            error, ctypes.sizeof(error))
        if status != 0:
            raise RuntimeError(f"{self.plugin_library.name}: {error.value.decode()}")
        fenced.check(self.plugin_library.name)
        return output
