"""``mra-export export``: a local transformers MRA checkpoint -> an ONNX export folder.

The folder holds ``model.onnx`` (with ``model.onnx.data`` past 2 GB), ``config.json``, the
source's tokenizer files and ``export.json``. One file serves every batch size and every length
from 1 to ``max_position_embeddings``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
import transformers
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER  # a tokenizer without a limit

from .. import __version__
from ..checkpoints import Checkpoint, open_checkpoint
from ..errors import UserError, first_line, warn
from ..files import sha256_of, staged_folder
from ..patching import attention_cores, patch_model
from ..tasks import Task
from . import attention_function, graph_names, plugin_node, tracing
from .info import (DEFAULT_OPSET, DTYPE_NAMES, FLAVOURS, SUPPORTED_OPSETS, ExportInfo,
                   check_not_the_other_commands)

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))
ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXTERNAL_DATA_ABOVE = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom
VALIDATION_TOLERANCE = 1e-4


def export_model(model_dir: str | Path, out: str | Path, task: str = "auto",
                 flavour: str = "portable", opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                 log=print) -> ExportInfo:
    """Export a local MRA checkpoint folder; returns the ``export.json`` it wrote.

    ``dtype`` is the type of the weights and activations in the graph (the attention itself
    computes in float32 either way). TensorRT 11 builds engines in the graph's own types, so an
    fp16 engine there needs an fp16 export.
    """
    if flavour not in FLAVOURS:
        raise UserError(f"unknown flavour {flavour!r}; choose one of: {', '.join(FLAVOURS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if opset not in SUPPORTED_OPSETS:
        raise UserError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}.."
                        f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    checkpoint = open_checkpoint(model_dir, task)  # config, task and tokenizer presence, once
    config, chosen = checkpoint.config, checkpoint.task
    if flavour == "plugin":
        plugin_node.check_head_dim(config.hidden_size // config.num_attention_heads)
    check_not_the_other_commands(out, quantizing=False)
    with staged_folder(out, marker=ExportInfo.FILE_NAME, inputs=[model_dir]) as staging:
        log(f"loading {chosen.model_class_name} from {model_dir}")
        model = patch_model(checkpoint.model, attention="reference").to(DTYPES[dtype])
        log(f"exporting {chosen.name} ({flavour} flavour, {dtype}, opset {opset}) ...")
        onnx_model = _trace(model, chosen, flavour, opset)
        contexts = _name_graph(onnx_model, chosen, config)
        onnx_path = staging / "model.onnx"
        external = _save(onnx_model, onnx_path)
        log("checking with onnx.checker (full_check) ...")
        _check(onnx_path)
        if flavour == "portable" and dtype == "fp32":
            validation = _validate_on_onnxruntime(model, chosen, onnx_path)
            log(f"onnxruntime vs PyTorch on a sample: max abs {validation['max_abs']:.2e}")
        else:
            validation = {"skipped": "onnxruntime CPU checks fp32 portable exports; use "
                                     "mra-export parity for this one"}
        _save_config(config, dtype, staging)
        has_tokenizer = _copy_tokenizer(checkpoint, staging)
        info = _describe(model, checkpoint, flavour, dtype, opset, contexts, staging, external,
                         validation, has_tokenizer)
        info.save(staging)
    log(f"wrote {Path(out) / 'model.onnx'}")
    return info


class OnnxSignature(torch.nn.Module):
    """The task model with tensor inputs and a tuple of the task's outputs, for tracing."""

    def __init__(self, model, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra,
                             return_dict=True)
        return tuple(outputs[name] for name in self.task.outputs)


def example_inputs(task: Task, config, batch: int = 2, seq_len: int = 70,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs to trace or check with: lengths that are not block multiples, a ragged mask."""
    seq_len = max(2, min(seq_len, config.max_position_embeddings))
    shape = (batch, 2, seq_len) if task.has_choices else (batch, seq_len)
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, config.vocab_size, shape, generator=generator),
        "attention_mask": torch.ones(shape, dtype=torch.int64),
    }
    inputs["attention_mask"][-1, ..., seq_len // 2:] = 0
    if "token_type_ids" in task.input_names(config):
        inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, shape,
                                                 generator=generator)
    return inputs


def _trace(model, task: Task, flavour: str, opset: int) -> ir.Model:
    """The model's graph with each layer's attention context named (``graph_names``); the bench
    and tools trace RoBERTa with it too. While traced, each layer's attention is one node: the
    plugin's, or one the traced core's graph then replaces (attention_function says why)."""
    inputs = example_inputs(task, model.config)
    dynamic = torch.export.Dim.DYNAMIC  # named Dims trip torch's constraint solver here
    dynamic_shapes = {name: {axis: dynamic for axis in range(t.dim())}
                      for name, t in inputs.items()}
    node_of = plugin_node if flavour == "plugin" else attention_function  # whose node it is
    with plugin_node.plugin_nodes(model):
        onnx_model = tracing.onnx_graph(OnnxSignature(model, task).eval(), inputs,
                                        dynamic_shapes, opset, list(task.outputs),
                                        node_of.translation_table())
    if attention_cores(model):
        graph_names.name_attention_contexts(onnx_model)
        if flavour == "portable":
            attention_function.inline(onnx_model, attention_function.traced_core(model, inputs,
                                                                                 opset))
    return onnx_model


def _name_graph(onnx_model: ir.Model, task: Task, config) -> list[str]:
    """Names the axes, clears the exporter's debug records; returns the contexts' names."""
    axes = {name: task.input_axes for name in task.input_names(config)}
    graph_names.name_dynamic_axes(onnx_model, axes)
    for node in onnx_model.graph:  # the exporter's debug records: stack traces, FX node text
        node.metadata_props.clear()
    onnx_model.producer_name, onnx_model.producer_version = "mra-export", __version__
    onnx_model.metadata_props["mra_export.task"] = task.name
    return graph_names.attention_contexts(onnx_model)


def _save(onnx_model: ir.Model, path: Path) -> str | None:
    """Save, with the weights in ``model.onnx.data`` when the file would pass 2 GB."""
    weight_bytes = sum(v.const_value.nbytes for v in onnx_model.graph.initializers.values()
                       if v.const_value is not None)
    external = f"{path.name}.data" if weight_bytes > EXTERNAL_DATA_ABOVE else None
    ir.save(onnx_model, path, external_data=external)
    return external


def _check(path: Path) -> None:
    plugin_node.register_schema()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError("the exported model fails onnx.checker: "
                        f"{tracing.summary(error)}") from None


def _validate_on_onnxruntime(model, task: Task, path: Path) -> dict:
    """Optimum-style: the saved file on onnxruntime CPU against PyTorch, on fresh inputs."""
    import onnxruntime

    inputs = example_inputs(task, model.config, batch=3, seq_len=45, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(task.outputs), {n: t.numpy() for n, t in inputs.items()})
    with torch.no_grad():
        expected = model(**inputs, return_dict=True)
    max_abs = max(float(np.abs(expected[name].numpy() - value).max())
                  for name, value in zip(task.outputs, got))
    if not max_abs <= VALIDATION_TOLERANCE:
        raise UserError(f"the exported model differs from PyTorch by {max_abs:.3g} (tolerance "
                        f"{VALIDATION_TOLERANCE}) on onnxruntime; please report this")
    return {"provider": "CPUExecutionProvider", "max_abs": max_abs,
            "tolerance": VALIDATION_TOLERANCE, "batch": 3, "sequence_length": 45}


def _save_config(config, dtype: str, staging: Path) -> None:
    """The source's config with the graph's dtype, not the checkpoint's (on a copy: the
    checkpoint's config stays as read)."""
    config = copy.deepcopy(config)
    config.dtype = DTYPES[dtype]
    config.save_pretrained(staging)


def _copy_tokenizer(checkpoint: Checkpoint, staging: Path) -> bool:
    """Whether the export got the source's tokenizer (one that cannot be read is a warning)."""
    if not checkpoint.has_tokenizer:
        return False  # a checkpoint without tokenizer files is fine
    folder = checkpoint.folder
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:  # the model is still worth exporting
        warn(f"warning: the tokenizer files in {folder} cannot be read ({first_line(error)}); "
             "the export has no tokenizer")
        return False
    limit = checkpoint.config.max_position_embeddings
    if tokenizer.model_max_length > limit:  # truncation=True would still give too many tokens
        stops = ("sets no model_max_length" if tokenizer.model_max_length >= VERY_LARGE_INTEGER
                 else f"stops at {tokenizer.model_max_length} tokens (model_max_length)")
        warn(f"note: the tokenizer {stops}, the model at {limit} (max_position_embeddings): "
             f"pass max_length={limit} when truncating")
    tokenizer.save_pretrained(staging)
    return True


def _describe(model, checkpoint: Checkpoint, flavour, dtype, opset, contexts, staging: Path,
              external, validation, has_tokenizer) -> ExportInfo:
    task, config = checkpoint.task, checkpoint.config
    core = attention_cores(model)[0]
    heads = config.num_attention_heads
    files = ["model.onnx"] + ([external] if external else [])
    input_axes = dict(enumerate(task.input_axes))
    return ExportInfo(
        flavour=flavour, dtype=dtype, opset=opset, task=task.name,
        model_class=task.model_class_name,
        inputs={name: "int64" for name in task.input_names(config)},
        outputs={name: ONNX_DTYPE_NAMES[dtype] for name in task.outputs},
        dynamic_axes={**{name: {str(i): a for i, a in input_axes.items()}
                         for name in task.input_names(config)},
                      **{name: {str(i): a for i, a in enumerate(task.output_axes)}
                         for name in task.outputs}},
        max_sequence_length=config.max_position_embeddings,
        attention={**core.settings(), "heads": heads,
                   "head_dim": config.hidden_size // heads, "layers": len(contexts)},
        attention_contexts=contexts,
        attention_context_layout=plugin_node.NODE_LAYOUT if flavour == "plugin" else "bhsd",
        versions={"mra_export": __version__, "torch": torch.__version__,
                  "transformers": transformers.__version__, "onnx": onnx.__version__},
        onnx_file="model.onnx", external_data=external,
        sha256={name: sha256_of(staging / name) for name in files},
        source=str(Path(checkpoint.folder).absolute()),
        plugin=_plugin_contract() if flavour == "plugin" else None,
        validation=validation, tokenizer=has_tokenizer)


def _plugin_contract() -> dict:
    return {"domain": plugin_node.DOMAIN, "op_type": plugin_node.OP_TYPE,
            "plugin_version": plugin_node.PLUGIN_VERSION,
            "plugin_namespace": plugin_node.PLUGIN_NAMESPACE}
