"""Shared helpers: seeded inputs and small random MRA checkpoints saved with save_pretrained."""

from __future__ import annotations

import importlib.util
import re
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from mra_export.checkpoints import build_checkpoint
from mra_export.tasks import TASKS

from .shared_builds import build_each_once, run_folder

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# A model transformers' CUDA kernels handle (head_dim 64), with 8 position blocks so that both
# "every block selected" (S = 128) and "16 of 64 selected" (S = 256) occur.
SMALL_MODEL = dict(hidden_size=128, num_attention_heads=2, intermediate_size=256,
                   num_hidden_layers=2, max_position_embeddings=256, block_per_row=2,
                   initializer_range=0.1)
# For a test that exports a checkpoint of its own and does not look at layers: tracing each layer's
# attention is most of a portable export's time (about 20 s a layer on the 2-core machine).
ONE_LAYER_MODEL = dict(SMALL_MODEL, num_hidden_layers=1)
SEVERAL_CHUNKS_MODEL = dict(ONE_LAYER_MODEL, max_position_embeddings=512, block_per_row=4)
# The bench's model (mra_export.bench.models.SHAPES) made small enough for seconds-long runs.
SMALL_BENCH_SHAPES = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128,
                          vocab_size=500)
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    """``tools/NAME.py`` imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def random_qkv(batch, heads, seq_len, head_dim, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(batch, heads, seq_len, head_dim, generator=generator)
                 for _ in range(3))


def ragged_mask(batch: int, seq_len: int, lengths) -> torch.Tensor:
    """``[batch, seq]`` mask whose row b has ``lengths[b]`` real tokens."""
    positions = torch.arange(seq_len)[None, :]
    return (positions < torch.tensor(lengths)[:, None]).float()


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory):
    """One small random checkpoint folder per task (built once per test run)."""
    builds = {name: partial(build_checkpoint, task=task, **SMALL_MODEL)
              for name, task in TASKS.items()}
    return build_each_once(run_folder(tmp_path_factory) / "checkpoints", builds)


@pytest.fixture(scope="session")
def exports(small_checkpoints, tmp_path_factory):
    """Every head of ``small_checkpoints`` exported in both flavours: {(task, flavour): folder}."""
    root = run_folder(tmp_path_factory) / "exports"
    return {(task, flavour): folder for task, checkpoint in small_checkpoints.items()
            for flavour, folder in export_both_flavours(checkpoint, root / task, task=task).items()}


def onnx_model(graph, opsets: dict[str, int] | None = None):
    """A test graph as a model that onnxruntime loads from 1.20 on, whichever onnx made it: IR
    version 10 (make_model's default is the installed onnx's newest, which an older onnxruntime
    refuses: "Unsupported model IR version"). ``opsets``: domain -> version, default opset 20."""
    from onnx import helper

    opsets = {"": 20} if opsets is None else opsets
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid(domain, version) for domain, version in opsets.items()])


def export_both_flavours(checkpoint: Path, root: Path, **settings) -> dict[str, Path]:
    """``checkpoint`` exported in each flavour under ``root``: {flavour: folder}, in FLAVOURS'
    order. Under the run's folder (``run_folder``) each export is made once per test run."""
    from mra_export.export import FLAVOURS

    return build_each_once(root, {flavour: partial(_export, checkpoint, flavour=flavour,
                                                   **settings) for flavour in FLAVOURS})


def _export(checkpoint: Path, folder: Path, **settings) -> None:
    """The session's exports: the heads of one model share one trace of its attention."""
    from mra_export.export import export_model, reusing_traces

    with reusing_traces():
        export_model(checkpoint, folder, log=lambda message: None, **settings)


def cut_short_and_resigned(export: Path, folder: Path, kept: float = 0.5) -> Path:
    """A copy of ``export`` whose model.onnx is cut to ``kept`` of its bytes and given its
    checksum anew in export.json: it passes verify_files, not the reading."""
    import json
    import shutil

    from mra_export.files import sha256_of

    copy = shutil.copytree(export, folder)
    graph_bytes = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(graph_bytes[:int(len(graph_bytes) * kept)])
    record = json.loads((copy / "export.json").read_text())
    record["sha256"]["model.onnx"] = sha256_of(copy / "model.onnx")
    (copy / "export.json").write_text(json.dumps(record))
    return copy


@pytest.fixture(scope="session")
def several_chunks_export(tmp_path_factory):
    """A feature-extraction checkpoint whose rows select several chunks of blocks, and its
    portable export: ``(checkpoint, folder)``. The small checkpoints select at most 16 blocks
    per row, one chunk of the exported block sums; with 4 blocks per row at 512 positions a row
    selects 49 blocks at 200 tokens (4 chunks, the last padded) and 64 at 512 (4 whole chunks)."""
    task = TASKS["feature-extraction"]

    def build(root: Path) -> None:
        checkpoint = build_checkpoint(root / "checkpoint", task, **SEVERAL_CHUNKS_MODEL)
        _export(checkpoint, root / "export", task=task.name, flavour="portable")

    folders = build_each_once(run_folder(tmp_path_factory), {"several-chunks": build})
    return folders["several-chunks"] / "checkpoint", folders["several-chunks"] / "export"


@pytest.fixture(scope="session")
def fp16_exports(small_checkpoints, tmp_path_factory):
    """``small_checkpoints``' question-answering checkpoint and its fp16 exports:
    ``(checkpoint, {flavour: folder})``, shared because a portable export costs the suite most of
    a minute (tracing the attention)."""
    checkpoint = small_checkpoints["question-answering"]
    return checkpoint, export_both_flavours(checkpoint, run_folder(tmp_path_factory) / "fp16",
                                            dtype="fp16")


@pytest.fixture(scope="session")
def bf16_exports(tmp_path_factory):
    """A question-answering checkpoint at the default weight scale, and its bf16 exports:
    ``(checkpoint, {flavour: folder})``. Not SMALL_MODEL's weights, five times larger: with them
    bf16's 8-bit mantissa flips near-tied block selections, so that even eager PyTorch in bf16
    moves an attention context by 0.13 against float32 (measured, one-off)."""
    root = run_folder(tmp_path_factory) / "bf16"
    build = partial(build_checkpoint, task=TASKS["question-answering"])
    checkpoint = build_each_once(root, {"checkpoint": build})["checkpoint"]
    return checkpoint, export_both_flavours(checkpoint, root, dtype="bf16")


def _native_library(file_name: str, target: str):
    """A library of plugins/ (plugins/build, made by `make plugins`; built here if missing)."""
    from mra_export import native

    return native.MraLibrary(native.ensure_built(file_name, target))


def program_or_skip(program: str, compiler_check: str, needs: str) -> Path:
    """plugins' ``program`` (built by CMake where missing); skips where CMake found the compiler
    without what it needs (its check ``compiler_check`` failed: plugins/CMakeLists.txt skips it)."""
    from mra_export import native
    from mra_export.errors import UserError

    try:
        return native.ensure_built(program, program)
    except UserError:
        cache = native.build_dir() / "CMakeCache.txt"
        if cache.is_file() and f"{compiler_check}:INTERNAL=1" not in cache.read_text():
            pytest.skip(f"the C++ compiler has no {needs} (plugins/CMakeLists.txt skips {program})")
        raise


def built_or_skip(name: str) -> Path:
    """plugins/build's ``name`` as `make plugins` left it; skips where it was not built (CMake
    skips the CUDA parts without nvcc, the plugin without TensorRT's headers)."""
    from mra_export import native

    path = native.build_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} was not built (make plugins: the CUDA kernels need nvcc, the plugin "
                    "TensorRT's headers via TensorRT_ROOT or TRT_INCLUDE_DIR)")
    return path


def disassembly_tools_or_skip(sass_accesses, binaries=("cuobjdump", "nvdisasm", "c++filt")) -> None:
    """Skips where a binary the tools reading the built library's cubins run is missing: NVIDIA's
    cuobjdump and nvdisasm (make setup installs them from PyPI), binutils' c++filt.
    ``sass_accesses``: tools/sass_accesses.py as the test loaded it, whose lookup the tools use."""
    from mra_export.errors import UserError

    try:
        for name in binaries:
            sass_accesses.binary(name)
    except UserError as error:
        pytest.skip(str(error))


def cuda_architectures_named() -> list[str]:
    """The architectures the CMake build compiles the kernels for ("sm_80", ...)."""
    from mra_export import native

    cache = (native.build_dir() / "CMakeCache.txt").read_text()
    named = re.search(r"^MRA_CUDA_ARCHITECTURES:STRING=(.*)$", cache, re.MULTILINE).group(1)
    return sorted(f"sm_{arch}" for arch in named.split(";"))


@pytest.fixture(scope="session")
def cpu_library():
    """The C++ CPU reference."""
    from mra_export import native

    return _native_library(native.CPU_LIBRARY, "mra_attention_cpu")


@pytest.fixture(scope="session")
def emulated_kernels():
    """The CUDA kernels' source compiled for the CPU under plugins/tests/cuda_emulation."""
    from mra_export import native

    return _native_library(native.CUDA_EMULATED_LIBRARY, "mra_attention_cuda_emulated")


def tensorrt_headers() -> Path | None:
    """The folder holding TensorRT's NvInferRuntime.h, from TRT_INCLUDE_DIR or TensorRT_ROOT (as
    plugins/CMakeLists.txt finds it), or None."""
    import os

    for folder in (os.environ.get("TRT_INCLUDE_DIR"), os.environ.get("TensorRT_ROOT")):
        for candidate in ([Path(folder), Path(folder) / "include"] if folder else []):
            if (candidate / "NvInferRuntime.h").is_file():
                return candidate
    return None


@pytest.fixture(scope="session")
def emulated_plugin():
    """The TensorRT plugin over the emulated kernels, driven as TensorRT drives it. It compiles
    against TensorRT's headers only; where none are given (CI) the tests using it are skipped."""
    from mra_export import native

    targets = {native.PLUGIN_EMULATED_LIBRARY: "mra_attention_plugin_emulated",
               native.PLUGIN_RUNNER_LIBRARY: "mra_attention_plugin_runner"}
    if native.unbuilt(*targets) and tensorrt_headers() is None:
        pytest.skip("the plugin over the emulated kernels needs TensorRT's headers to compile: "
                    "set TRT_INCLUDE_DIR or TensorRT_ROOT (fetch NVIDIA/TensorRT; none in CI)")
    paths = [native.ensure_built(name, target) for name, target in targets.items()]
    return native.PluginRunner(*paths)
