"""The benchmarked models and the ways of running them.

MRA with mra-base shapes (hidden 768, 12 heads, intermediate 3072, 8 blocks per row at 4096
positions) against what a user would pick instead: transformers' RoBERTa of the same size
(its default SDPA attention). Both are exported to ONNX by the same code path.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort
import torch
from transformers import MraConfig, MraModel, RobertaConfig, RobertaModel

from .. import fused
from ..export.exporter import _trace
from ..export.quantize import quantize_graph
from ..native import build_dir
from ..patching import patch_model
from ..runtime.ort import (CPU, CUDA, default_options, device_binding,
                           op_library_unavailable, register_op_library)
from ..tasks import TASKS

MAX_LENGTH = 4096
SHAPES = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=50265,
              type_vocab_size=1,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclasses.dataclass
class Backend:
    name: str  # e.g. "mra onnxruntime"
    model: str  # "mra" or "dense"
    runtime: str
    prepare: Callable | None = None  # (batch, length) -> run()
    skipped: str | None = None

    @property
    def on_gpu(self) -> bool:
        return "cuda" in self.runtime or self.runtime.startswith("tensorrt")


def build_models(layers: int, seed: int = 0):
    torch.manual_seed(seed)
    mra = MraModel(MraConfig(**SHAPES, num_hidden_layers=layers, max_position_embeddings=MAX_LENGTH,
                             block_per_row=8)).eval()
    torch.manual_seed(seed)
    dense = RobertaModel(RobertaConfig(**SHAPES, num_hidden_layers=layers,
                                       max_position_embeddings=MAX_LENGTH + 2)).eval()
    return patch_model(mra, attention="reference"), dense


def export(model, path: Path, flavour: str = "portable") -> Path:
    """The portable export of mra-export's exporter (for RoBERTa too: the same tracing), or
    MRA's plugin flavour (one MraAttention node per layer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(_trace(model, TASKS["feature-extraction"], flavour, 20), path)
    return path


def quantize(path: Path, layers: int) -> Path:
    """The int8 graph of an fp32 one, quantized as mra-export quantize does (encoder weight
    MatMuls, dynamic): for RoBERTa too, whose layers have the same six weight products."""
    target = path.with_name(f"{path.stem}-int8.onnx")
    quantize_graph(path, target, layers)
    return target


def inputs(batch: int, length: int, device="cpu"):
    generator = torch.Generator().manual_seed(batch * 100_003 + length)
    ids = torch.randint(5, SHAPES["vocab_size"], (batch, length), generator=generator)
    return ids.to(device), torch.ones(batch, length, dtype=torch.int64, device=device)


def torch_backend(name: str, kind: str, model, device: str) -> Backend:
    def prepare(batch, length):
        ids, mask = inputs(batch, length, device)

        def run():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            if device == "cuda":
                torch.cuda.synchronize()
        return run
    if device != "cpu":  # a copy: Module.to moves in place, and the CPU backends keep theirs
        model = copy.deepcopy(model).to(device)
    return Backend(name, kind, f"pytorch-{device}", prepare)


def ort_backend(name: str, kind: str, path: Path, provider: str, op_library: bool = False) -> Backend:
    """``path`` on onnxruntime's ``provider``; ``op_library``: with libmra_attention_ort.so
    registered, which computes a plugin-flavour graph's MraAttention nodes."""
    if provider not in ort.get_available_providers():
        return Backend(name, kind, "onnxruntime", skipped=f"this onnxruntime has no {provider}")

    def prepare(batch, length):
        # A fresh session per shape: onnxruntime's arena keeps what earlier shapes reserved, so
        # a reused session would hide this shape's peak memory.
        options = default_options()
        if op_library:
            register_op_library(options)
        session = ort.InferenceSession(str(path), options, providers=[provider])
        ids, mask = inputs(batch, length)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if provider == CUDA:  # inputs and outputs on the GPU, as the PyTorch-CUDA columns' are
            binding = device_binding(session, feed)
            return lambda: session.run_with_iobinding(binding)
        return lambda: session.run(None, feed)
    return Backend(name, kind, f"onnxruntime-{provider.replace('ExecutionProvider', '').lower()}", prepare)


# The GPU columns come in both precisions: fp16 is what engines are built in, fp32 what the CPU
# columns are. The CPU columns stay fp32 (onnxruntime's CPU provider lacks fp16 kernels).
GPU_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NO_GPU = "no CUDA GPU here"


def backends(mra, dense, folder: Path, log, device: str = "all") -> list[Backend]:
    """The columns of the bench: ``device`` "cpu", "cuda" (its GPU columns and TensorRT) or
    "all"."""
    found = []
    if device in ("all", "cpu"):
        found += cpu_backends(mra, dense, folder, log)
    if device in ("all", "cuda"):
        for dtype in GPU_DTYPES:
            found += cuda_backends(mra, dense, folder, log, dtype)
        found.append(tensorrt_backend(mra, folder, log))
    return found


def cpu_backends(mra, dense, folder: Path, log) -> list[Backend]:
    log("exporting both models to ONNX ...")
    mra_onnx, dense_onnx = export(mra, folder / "mra.onnx"), export(dense, folder / "dense.onnx")
    log("quantizing both to int8 (as mra-export quantize) ...")
    layers = mra.config.num_hidden_layers
    mra_int8, dense_int8 = quantize(mra_onnx, layers), quantize(dense_onnx, layers)
    return [torch_backend("mra pytorch", "mra", mra, "cpu"),
            fused_backend(f"mra pytorch {FUSED_SUFFIX}", mra, "cpu"),
            ort_backend("mra onnxruntime", "mra", mra_onnx, CPU),
            ort_backend("mra onnxruntime int8", "mra", mra_int8, CPU),
            torch_backend("dense pytorch", "dense", dense, "cpu"),
            ort_backend("dense onnxruntime", "dense", dense_onnx, CPU),
            ort_backend("dense onnxruntime int8", "dense", dense_int8, CPU),
            op_backend(f"mra onnxruntime {OP_SUFFIX}", mra, folder / "mra-plugin.onnx", log, CPU)]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_backends(mra, dense, folder: Path, log, dtype: str = "fp32") -> list[Backend]:
    """PyTorch on CUDA (MRA's reference attention and the fused op, RoBERTa's SDPA) and
    onnxruntime's CUDA provider (MRA's portable graph and its MraAttention-op graph, RoBERTa),
    the weights and activations in ``dtype``; names carry " fp16" for fp16."""
    tag = "" if dtype == "fp32" else f" {dtype}"
    names = [f"mra pytorch-cuda{tag}", f"mra pytorch-cuda{tag} {FUSED_SUFFIX}",
             f"dense pytorch-cuda{tag}", f"mra onnxruntime-cuda{tag}",
             f"dense onnxruntime-cuda{tag}", f"mra onnxruntime-cuda{tag} {OP_SUFFIX}"]
    if not cuda_available():  # each name reads "<model> <runtime> ..."
        return [Backend(name, *name.split()[:2], skipped=NO_GPU) for name in names]
    reference, fused_op, sdpa, portable, dense_ort, op_graph = names
    mra, dense = (copy.deepcopy(m).to(GPU_DTYPES[dtype]) for m in (mra, dense))
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    log(f"exporting both models to ONNX ({dtype}) ...")
    mra_onnx = export(mra, folder / f"mra{suffix}.onnx")
    dense_onnx = export(dense, folder / f"dense{suffix}.onnx")
    return [torch_backend(reference, "mra", mra, "cuda"),
            fused_backend(fused_op, mra, "cuda"),
            torch_backend(sdpa, "dense", dense, "cuda"),
            ort_backend(portable, "mra", mra_onnx, CUDA),
            ort_backend(dense_ort, "dense", dense_onnx, CUDA),
            op_backend(op_graph, mra, folder / f"mra-plugin{suffix}.onnx", log, CUDA)]


OP_SUFFIX = "(MraAttention op)"
FUSED_SUFFIX = "(fused op)"


def fused_backend(name: str, mra, device: str) -> Backend:
    """The patched model with ``attention="fused"``: the mra_export::mra_attention op over the
    C++ twin (cpu) or the CUDA kernels (cuda)."""
    if not fused.library_built(device):
        return Backend(name, "mra", f"pytorch-{device}", skipped=(
            f"{build_dir() / fused.LIBRARIES[device]} is not built (make plugins)"))
    return torch_backend(name, "mra", patch_model(copy.deepcopy(mra), attention="fused"), device)


def op_backend(name: str, mra, path: Path, log, provider: str) -> Backend:
    """MRA's plugin flavour (exported to ``path``) on onnxruntime, its MraAttention nodes
    computed by the op library: the C++ twin on the CPU provider, the CUDA kernels on the CUDA
    provider."""
    runtime = "onnxruntime-cpu" if provider == CPU else "onnxruntime-cuda"
    reason = op_library_unavailable(provider)
    if reason:
        return Backend(name, "mra", runtime, skipped=reason)
    if not path.is_file():  # the CPU and the fp32 CUDA columns share one export
        log(f"exporting MRA's plugin flavour (MraAttention nodes) to {path.name} for the "
            "onnxruntime op ...")
        export(mra, path, "plugin")
    return ort_backend(name, "mra", path, provider, op_library=True)


def tensorrt_backend(mra, folder: Path, log) -> Backend:
    """An fp16 engine of the MRA model (plugin export, profile up to batch 8 x 4096)."""
    from ..engines.availability import tensorrt_unavailable_reason
    from ..native import PLUGIN_LIBRARY, build_dir

    reason = tensorrt_unavailable_reason()
    plugin = build_dir() / PLUGIN_LIBRARY
    if reason or not plugin.is_file():
        return Backend("mra tensorrt", "mra", "tensorrt",
                       skipped=reason or f"{plugin} is not built (make plugins TensorRT_ROOT=...)")
    from ..engines.build import build_engine
    from ..engines.spec import BuildSpec
    from ..export import export_model
    from ..runtime.trt import TrtMraModel

    log("exporting the plugin flavour (fp16) and building a TensorRT engine ...")
    export_dir = folder / "mra-plugin-fp16"
    mra.save_pretrained(folder / "mra-checkpoint")
    export_model(folder / "mra-checkpoint", export_dir, "feature-extraction", "plugin", dtype="fp16",
                 log=lambda m: None)
    engine_dir = folder / "mra-engine-fp16"
    build_engine(BuildSpec(onnx=export_dir, out=engine_dir, plugin=plugin, precision="fp16",
                           shapes={"batch": (1, 1, 8), "sequence": (1, 1024, MAX_LENGTH)}), log=log)
    model = TrtMraModel.from_engine(engine_dir)

    def prepare(batch, length):
        ids, mask = inputs(batch, length)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        return lambda: model.run_raw(feed)
    return Backend("mra tensorrt", "mra", "tensorrt-fp16", prepare)


def dense_attention_bytes(batch: int, length: int) -> int:
    """What onnxruntime's dense attention materialises: scores and probabilities, float32."""
    return 2 * batch * SHAPES["num_attention_heads"] * length * length * 4


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0

