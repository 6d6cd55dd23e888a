"""``mra-export quantize``: an fp32 portable export -> an int8 export for onnxruntime's CPU.

onnxruntime's own dynamic quantization (``onnxruntime.quantization.quantize_dynamic``, what
Optimum's ORTQuantizer applies): the encoder's weight MatMuls get int8 weights, one scale per
output channel, and quantize their activations at run time (uint8, one scale per tensor per
run). ``reduce_range`` keeps the weights to 7 bits, which onnxruntime advises for CPUs without
VNNI: there its uint8 x int8 products sum pairs in 16 bits, which 8-bit weights can saturate. A
weight MatMul is one whose second input is an initializer; the encoder has six per layer
(query, key, value and output projections, the two feed-forward products), where the time goes.
MRA's own block products and sums multiply two activations and stay float32, as do the task
head (its products are small, and they set the answer: quantizing them flipped 2.2% of the demo's
fill-mask tokens and 1 in 16 of its answer ends), every other node and the outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..checkpoints import load_config
from ..errors import UserError, first_line, upgrade_fix, warn
from ..files import raise_naming, sha256_of, staged_folder
from ..machine import cpu_without_vnni
from ..tasks import get_task
from .info import QUANTIZED_DTYPES, ExportInfo, check_not_the_other_commands, read_graph
from .tracing import quiet_logger

INT8 = QUANTIZED_DTYPES[0]
QUANTIZED_OP = "MatMulInteger"  # what quantize_dynamic makes of a MatMul
QUANTIZED_SUFFIX = "_quant"  # ... named after it: "<MatMul's name>_quant"
SCHEME = {
    "scheme": "dynamic",
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "activations": "uint8, asymmetric, one scale per tensor, computed at run time "
                   "(DynamicQuantizeLinear)",
    "selected": "the encoder's MatMuls whose second input is an initializer (six per layer); "
                "MatMuls of two activations (the attention's block products), the task head's "
                "and all other nodes stay float32",
}


def quantize_export(onnx_dir: str | Path, out: str | Path, log=print, *,
                    reduce_range: bool = False) -> ExportInfo:
    """Quantize the fp32 portable export in ``onnx_dir`` into ``out``, with 7-bit weights where
    ``reduce_range``; returns the new ``export.json``. ``out`` is written whole or not at all."""
    info = _quantizable(onnx_dir)
    source = info.onnx_path(onnx_dir)
    check_not_the_other_commands(out, quantizing=True)
    with staged_folder(out, marker=ExportInfo.FILE_NAME, inputs=[onnx_dir]) as staging:
        log(f"quantizing the encoder's weight MatMuls of {source} to int8 (onnxruntime "
            f"{ort.__version__}) ...")
        target = staging / info.onnx_file
        chosen, kept_float = quantize_graph(source, target, info.attention["layers"],
                                            external_data=bool(info.external_data),
                                            reduce_range=reduce_range)
        _copy_other_files(onnx_dir, info, staging)
        validation = _validate(onnx_dir, info, target)
        log(f"int8 vs the fp32 export on onnxruntime, on a sample: max abs "
            f"{validation['max_abs_vs_fp32_export']:.2e}")
        quantized = _describe(info, onnx_dir, staging, chosen, kept_float, validation,
                              reduce_range)
        quantized.save(staging)
    log(f"wrote {Path(out) / info.onnx_file}")
    if not reduce_range and cpu_without_vnni():
        warn("note: this CPU has no VNNI, where onnxruntime's int8 products can saturate with "
             "8-bit weights; where the int8 export runs on such a CPU, quantize with "
             "--reduce-range (7-bit weights), which is more accurate there")
    return quantized


def _quantizable(onnx_dir) -> ExportInfo:
    """The export.json of ``onnx_dir`` if it is an fp32 portable export, files verified."""
    if not str(onnx_dir).strip():
        raise UserError("--onnx takes an export folder, got ''")
    if not Path(onnx_dir).is_dir():
        raise UserError(f"export folder {onnx_dir} does not exist; pass a folder made by "
                        "mra-export export")
    info = ExportInfo.load(onnx_dir)
    if info.flavour == "plugin":
        raise UserError(f"{onnx_dir} is a plugin-flavour export (for TensorRT engines, whose "
                        "precision mra-export build sets); quantize a portable export "
                        "(mra-export export --flavour portable)")
    if info.dtype in QUANTIZED_DTYPES:
        raise UserError(f"{onnx_dir} is already quantized ({info.dtype}); quantize the fp32 "
                        f"export it was made from ({(info.quantization or {}).get('source')})")
    if info.dtype != "fp32":
        raise UserError(f"{onnx_dir} has {info.dtype} weights; int8 is quantized from float32 "
                        "weights: quantize an fp32 export (mra-export export --dtype fp32)")
    info.verify_files(onnx_dir)
    return info


def quantize_graph(source: Path, target: Path, layers: int, external_data: bool = False,
                   reduce_range: bool = False) -> tuple[list[str], list[str]]:
    """Write ``source`` (an fp32 encoder of ``layers`` layers, as mra-export exports them) with
    its encoder's weight MatMuls in int8 (7-bit where ``reduce_range``) to ``target``; returns
    (the MatMuls quantized, those left float), by their names in ``source``, as read back from
    ``target``."""
    graph = read_graph(source)  # names and types only
    weights, activations = split_matmuls(graph)
    chosen = encoder_matmuls(graph, weights, layers, source)
    kept_float = [name for name in weights + activations if name not in chosen]
    _quantize(source, target, chosen, external_data, reduce_range)
    _check_quantized(target, chosen, kept_float)
    return chosen, kept_float


def split_matmuls(graph: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The names of the graph's MatMul nodes: (those whose second input is an initializer, the
    others). Only the first are quantized."""
    initializers = {tensor.name for tensor in graph.graph.initializer}
    matmuls = [node for node in graph.graph.node if node.op_type == "MatMul"]
    weights = [node.name for node in matmuls if node.input[1] in initializers]
    return weights, [node.name for node in matmuls if node.input[1] not in initializers]


PER_LAYER = 6  # query, key, value, attention output, feed-forward in and out


def encoder_matmuls(graph: onnx.ModelProto, weight_matmuls: list[str], layers: int,
                    source) -> list[str]:
    """The encoder layers' weight MatMuls: the first six per layer in graph order (the exporter
    writes the nodes in the order the model runs them), each layer's first three (query, key,
    value) reading one tensor. The task head's come after them."""
    encoder = weight_matmuls[:PER_LAYER * layers]
    inputs = {node.name: node.input[0] for node in graph.graph.node}
    qkv = [{inputs[name] for name in encoder[start:start + 3]}
           for start in range(0, len(encoder), PER_LAYER)]
    if len(encoder) < PER_LAYER * layers or any(len(reads) != 1 for reads in qkv):
        raise UserError(f"{source} does not have the {PER_LAYER} weight MatMuls per encoder layer "
                        "that mra-export exports; export the model again with mra-export export")
    return encoder


def _quantize(source: Path, target: Path, nodes: list[str], external: bool,
              reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    chatter = io.StringIO()  # it logs advice on pre-processing, which static quantization needs
    with contextlib.redirect_stdout(chatter), quiet_logger(""):
        try:
            quantize_dynamic(source, target, op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=nodes, per_channel=True, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, use_external_data_format=external,
                             extra_options={"MatMulConstBOnly": True})
        except OSError as error:  # the system's (a full disk): the CLI's one line names target
            raise_naming(error, target)
        except Exception as error:  # onnxruntime.quantization raises whatever its steps raise
            raise UserError(f"onnxruntime could not quantize {source}: {first_line(error)}; "
                            f"{_fix_for_quantizer_failure()}") from None


# onnxruntime 1.20.1 to 1.31.1 (seven tried on a text-classification export) failed in
# quantize_dynamic with "Inferred shape and existing shape differ"; 1.32.0 quantizes it. Read from
# their code, not traced: before 1.32 the rewrite of a Gemm (the head) to a MatMul of the
# transposed weight leaves the old shape where onnx's shape inference then finds it.
QUANTIZER_FIXED_IN = "1.32"


def _fix_for_quantizer_failure() -> str:
    fix = upgrade_fix("onnxruntime", ort.__version__, QUANTIZER_FIXED_IN)
    if fix is None:
        return "please report this"
    return (f"onnxruntime {ort.__version__}'s quantizer fails on graphs with a Gemm (the task "
            f"heads'): {fix}")


def weights_scheme(reduce_range: bool) -> str:
    """export.json's description of the int8 weights."""
    bits = "7-bit range (reduce_range)" if reduce_range else "full 8-bit range"
    return f"int8, symmetric, one scale per output channel (QInt8, per_channel), {bits}"


def quantized_nodes(graph: onnx.ModelProto) -> list[str]:
    """The MatMuls of the fp32 graph that ``graph`` computes in int8, by their fp32 names: its
    MatMulInteger nodes whose second input is an int8 initializer."""
    int8 = {t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return [node.name.removesuffix(QUANTIZED_SUFFIX) for node in graph.graph.node
            if node.op_type == QUANTIZED_OP and node.input[1] in int8]


def _check_quantized(path: Path, chosen: list[str], kept_float: list[str]) -> None:
    """Read back what got quantized: every chosen MatMul, to int8, and no other (the others,
    the attention's among them, still float MatMuls; the heads' Gemm layers may come back as
    float MatMuls, onnxruntime's quantizer rewrites every Gemm)."""
    graph = onnx.load(str(path), load_external_data=False)
    quantized = quantized_nodes(graph)
    still_float = {node.name for node in graph.graph.node if node.op_type == "MatMul"}
    if sorted(quantized) != sorted(chosen) or not set(kept_float) <= still_float:
        missed = sorted(set(chosen) - set(quantized))
        raise UserError(f"onnxruntime {ort.__version__} quantized other nodes than asked for "
                        f"(not quantized: {missed[:3]}; attention MatMuls changed: "
                        f"{sorted(set(kept_float) - still_float)[:3]}); please report this")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"the quantized model fails onnx.checker: {first_line(error)}; please "
                        "report this") from None


def _copy_other_files(onnx_dir, info: ExportInfo, staging: Path) -> None:
    """config.json and the tokenizer's files, as they are in the source export."""
    graph_files = {info.onnx_file, info.external_data, ExportInfo.FILE_NAME}
    for path in sorted(Path(onnx_dir).iterdir()):
        if path.is_file() and path.name not in graph_files and not path.name.startswith("."):
            shutil.copy2(path, staging / path.name)


# The sample the exporter checks fp32 exports on (exporter._validate_on_onnxruntime).
SAMPLE = dict(batch=3, seq_len=45, seed=1)


def _validate(onnx_dir, info: ExportInfo, target: Path) -> dict:
    """The int8 graph must load and run in onnxruntime on the CPU with finite results; its
    distance from the fp32 export on a sample is recorded (parity judges it: mra-export parity
    compares with PyTorch and checks the task's agreement)."""
    from .exporter import example_inputs

    task = get_task(info.task)
    feed = {name: tensor.numpy() for name, tensor in
            example_inputs(task, load_config(onnx_dir), **SAMPLE).items()}
    try:
        int8 = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = int8.run(list(task.outputs), feed)
    except Exception as error:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot run the quantized model: {first_line(error)}; "
                        "please report this") from None
    fp32 = ort.InferenceSession(str(info.onnx_path(onnx_dir)), providers=["CPUExecutionProvider"])
    expected = fp32.run(list(task.outputs), feed)
    if not all(np.isfinite(value).all() for value in got):
        raise UserError("the quantized model computes non-finite values on a sample; please "
                        "report this")
    max_abs = max(float(np.abs(a - b).max()) for a, b in zip(got, expected))
    return {"provider": "CPUExecutionProvider", "max_abs_vs_fp32_export": max_abs,
            "batch": SAMPLE["batch"], "sequence_length": SAMPLE["seq_len"],
            "note": "recorded, not a criterion: mra-export parity checks int8 exports by task "
                    "agreement with the float32 PyTorch model"}


def _describe(info: ExportInfo, onnx_dir, staging: Path, chosen, kept_float,
              validation, reduce_range: bool) -> ExportInfo:
    files = [name for name in (info.onnx_file, f"{info.onnx_file}.data")
             if (staging / name).is_file()]
    return dataclasses.replace(
        info, dtype=INT8, external_data=files[1] if len(files) > 1 else None,
        sha256={name: sha256_of(staging / name) for name in files},
        versions={**info.versions, "onnxruntime": ort.__version__},
        validation=validation,
        quantization={**SCHEME, "weights": weights_scheme(reduce_range),
                      "reduce_range": reduce_range,
                      "onnxruntime": ort.__version__, "nodes": list(chosen),
                      "float_matmuls": list(kept_float),
                      "source": str(Path(onnx_dir).absolute()),
                      "source_sha256": info.sha256[info.onnx_file]})
