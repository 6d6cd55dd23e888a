"""The demo's TensorRT step: fp32 and fp16 engines of every head, with attention outputs."""

from __future__ import annotations

from pathlib import Path

from ..export import export_model
from ..native import PLUGIN_LIBRARY, build_dir
from .build import build_engine
from .spec import BuildSpec
from .system import current_system

PRECISIONS = ("fp32", "fp16")


def build_demo_engines(checkpoints: dict, plugin_exports: dict, out: Path, log) -> dict:
    """{task: [engine folders]}; {} with the reason logged when the plugin is not built."""
    plugin = build_dir() / PLUGIN_LIBRARY
    if not plugin.is_file():
        log(f"   skipped: {plugin} is not built (make plugins TensorRT_ROOT=<TensorRT folder>)")
        return {}
    current_system("the demo's TensorRT engines")  # TensorRT that loads and a GPU, or one line
    engines = {}
    for task, checkpoint in checkpoints.items():
        for precision in PRECISIONS:
            source = plugin_exports[task]
            if precision != "fp32":  # an export of that type: TensorRT 10 and 11 both build it
                source = out / "onnx" / f"{task}-plugin-{precision}"
                export_model(checkpoint, source, task, "plugin", dtype=precision, log=lambda m: None)
            folder = out / "engines" / f"{task}-{precision}"
            build_engine(BuildSpec(onnx=source, out=folder, plugin=plugin, precision=precision,
                                   attention_outputs=True,
                                   timing_cache=out / "engines" / "timing.cache"), log=log)
            engines.setdefault(task, []).append(folder)
    return engines
