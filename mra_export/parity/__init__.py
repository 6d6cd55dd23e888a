"""``mra-export parity``: every backend of an exported head against the patched PyTorch model."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoints import load_config, load_model
from ..engines.manifest import EngineManifest
from ..engines.system import fitting_manifest
from ..errors import MissingTensorRT, UserError, warn
from ..export.info import ExportInfo, read_graph
from ..patching import patch_model
from ..tasks import get_task
from .backends import engine_backends, export_backends, tensorrt_available
from .compare import check_backend, run_quietly
from .inputs import describe, parity_feeds
from .report import ParityReport, format_table
from .runners import TorchRunner

__all__ = ["ParityReport", "format_table", "run_parity"]


def run_parity(model_dir: str | Path, onnx_dirs=(), engine_dirs=(), seed: int = 0,
               log=print) -> ParityReport:
    """Check each export folder (and engine) against the patched PyTorch model of
    ``model_dir`` on seeded inputs (``report.save(path)`` writes the JSON report).
    ``onnx_dirs`` and ``engine_dirs``: a folder, or a list of them."""
    onnx_dirs, engine_dirs = _folders(onnx_dirs), _folders(engine_dirs)
    if not onnx_dirs and not engine_dirs:
        raise UserError("nothing to check: pass --onnx OUT (an export folder) or --engine DIR")
    if not all(str(folder).strip() for folder in (*onnx_dirs, *engine_dirs)):
        raise UserError("--onnx and --engine take a folder, got ''")
    onnx_dirs, engine_dirs = _once_each(onnx_dirs), _once_each(engine_dirs)
    if engine_dirs and not tensorrt_available():
        raise MissingTensorRT("mra-export parity --engine")
    for folder in engine_dirs:  # an engine built for another machine is one line, not a result
        fitting_manifest(folder, "mra-export parity --engine")
    infos = [ExportInfo.load(folder) for folder in onnx_dirs]
    for folder, info in zip(onnx_dirs, infos):
        info.verify_files(folder)  # a corrupt or replaced model.onnx is one line, not a result
        read_graph(info.onnx_path(folder))  # and so is one re-signed after it was cut short
    tasks = {info.task for info in infos}
    if len(tasks) > 1:
        raise UserError(f"the export folders are for different tasks ({', '.join(sorted(tasks))})"
                        "; check one head at a time")
    task = get_task(tasks.pop()) if tasks else _engine_task(engine_dirs)
    model = patch_model(load_model(model_dir, task, remedy="pass the checkpoint the export was "
                                                          "made from")[0], attention="reference")
    for folder, info in zip(onnx_dirs, infos):
        _check_same_shapes(folder, load_config(folder), model.config)
        if Path(info.source).resolve() != Path(model_dir).resolve():  # a likely reason to fail
            warn(f"note: {folder} was exported from {info.source}, not from {model_dir}")
    input_names = task.input_names(model.config)
    contexts = [f"attention_context.{layer}" for layer in range(model.config.num_hidden_layers)]
    feeds = parity_feeds(task, model.config, seed)
    log(f"parity for {task.name}: {len(feeds)} input sets, PyTorch reference ...")
    reference = run_quietly([TorchRunner(model, task, input_names)], feeds)
    backends = [b for folder in onnx_dirs for b in export_backends(folder)]
    backends += engine_backends(engine_dirs)
    results = []
    for backend in backends:
        if not backend.skipped:
            log(f"  {backend.name} ({backend.source}) ...")
        results.append(check_backend(backend, reference, feeds, task, input_names, contexts))
    return ParityReport(str(Path(model_dir).absolute()), task.name,
                        [describe(feed) for feed in feeds], results)


def _engine_task(engine_dirs):
    return get_task(EngineManifest.load(engine_dirs[0]).export["task"])


def _folders(given) -> list:
    """A folder or several: ``run_parity(model, "out")`` checks the folder ``out``, not its
    letters."""
    if given is None:
        return []
    return [given] if isinstance(given, (str, os.PathLike)) else list(given)


def _once_each(folders) -> list:
    """The folders in the order given, each once: ``--onnx out --onnx ./out`` checks it once."""
    unique = {}
    for folder in folders:
        unique.setdefault(Path(folder).resolve(), folder)
    return list(unique.values())


# What must agree between an export and the checkpoint it is checked against, for the inputs
# drawn from the checkpoint's config to fit the graph.
SHAPE_SETTINGS = ("vocab_size", "type_vocab_size", "max_position_embeddings", "hidden_size",
                  "num_hidden_layers", "num_attention_heads")


def _check_same_shapes(folder, exported, given) -> None:
    for name in SHAPE_SETTINGS:
        if getattr(exported, name) != getattr(given, name):
            raise UserError(f"{folder} was exported from a model with {name}="
                            f"{getattr(exported, name)}, but --model has {getattr(given, name)}; "
                            "pass the checkpoint the export was made from")
