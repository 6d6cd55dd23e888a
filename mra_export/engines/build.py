"""``mra-export build``: a plugin-flavour ONNX export -> ``engines/NAME/model.plan`` + manifest.

The TensorRT work goes through TensorRT's plugin registry (the plugin library) and Polygraphy's
loaders (ONNX parser, profile, builder config, timing cache); everything else (the spec, the
checks, the files) is plain Python so that it is tested where TensorRT is absent. The engine
folder is built under a temporary name and renamed: a failed build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time

from .. import __version__
from ..checkpoints import TOKENIZER_FILES
from ..errors import UserError, first_line
from ..export import plugin_node
from ..export.info import ExportInfo
from ..files import sha256_of, staged_folder
from .manifest import ENGINE_FILE, EngineManifest, SystemInfo
from .plugin_library import register_plugin_library
from .spec import BuildSpec, resolve_spec
from .system import current_system

STRONGLY_TYPED_FROM = 11  # TensorRT 11 builds every network in its own types
COPIED_FILES = ("config.json", *TOKENIZER_FILES)


def build_from_args(args) -> EngineManifest:
    spec = resolve_spec(args.spec, onnx=args.onnx, plugin=args.plugin, out=args.out,
                        precision=args.precision, shapes=args.shapes,
                        timing_cache=args.timing_cache, workspace_mb=args.workspace,
                        attention_outputs=args.attention_outputs)
    return build_engine(spec, command=" ".join(["mra-export", *sys.argv[1:]]))


def build_engine(spec: BuildSpec, command: str = "", log=print, builder=None) -> EngineManifest:
    """Build ``spec`` into its engine folder; ``builder`` (for tests) replaces TensorRT."""
    system = current_system("mra-export build")  # TensorRT and a GPU, or one line and out
    info = _checked_export(spec)
    precision = _precision(spec, info, system)
    if not spec.plugin.is_file():
        raise UserError(f"plugin library {spec.plugin} not found; build it with 'make plugins "
                        "TensorRT_ROOT=<TensorRT folder>' or pass --plugin")
    profile = spec.profile(info)
    log(f"building a {precision} TensorRT {system.tensorrt_version} engine for {system.gpu_name} "
        f"from {spec.onnx_file} ...")
    started = time.time()
    inputs = [spec.onnx, spec.export_folder, spec.plugin,
              *([spec.timing_cache] if spec.timing_cache else [])]
    with staged_folder(spec.out, marker=EngineManifest.FILE_NAME, inputs=inputs) as staging:
        engine = (builder or build_serialized_engine)(spec, info, precision, profile, system)
        (staging / ENGINE_FILE).write_bytes(engine)
        for name in COPIED_FILES:  # the engine folder is self-contained for TrtMraModel
            if (spec.export_folder / name).is_file():
                shutil.copy2(spec.export_folder / name, staging / name)
        manifest = EngineManifest(
            tensorrt_version=system.tensorrt_version, gpu_name=system.gpu_name,
            compute_capability=system.compute_capability, precision=precision,
            profiles=[{name: dict(zip(("min", "opt", "max"), (list(s) for s in shapes)))
                       for name, shapes in profile.items()}],
            attention_outputs=spec.attention_outputs, onnx=str(spec.onnx_file.absolute()),
            plugin_library=str(spec.plugin.absolute()),
            sha256={"onnx": sha256_of(spec.onnx_file), "plugin": sha256_of(spec.plugin),
                    "engine": sha256_of(staging / ENGINE_FILE)},
            export=dataclasses.asdict(info), build_seconds=round(time.time() - started, 1),
            build_command=command, mra_export_version=__version__)
        manifest.save(staging)
    log(f"wrote {spec.out / ENGINE_FILE} ({manifest.build_seconds} s)")
    return manifest


def _checked_export(spec: BuildSpec) -> ExportInfo:
    folder = spec.export_folder
    info = ExportInfo.load(folder)
    info.verify_files(folder)
    if info.flavour != "plugin":
        raise UserError(f"{folder} is a {info.flavour} export; TensorRT engines are built from "
                        "plugin-flavour exports (mra-export export --flavour plugin)")
    if isinstance(info.attention.get("head_dim"), int):
        plugin_node.check_head_dim(info.attention["head_dim"])
    return info


def _precision(spec: BuildSpec, info: ExportInfo, system: SystemInfo) -> str:
    """The engine's precision: TensorRT 11+ builds the ONNX's own types (strongly typed);
    TensorRT 10 can also lower an fp32 export to fp16/bf16 with builder flags."""
    precision = spec.precision or info.dtype
    if precision == info.dtype:
        return precision
    strongly_typed = int(system.tensorrt_version.split(".")[0]) >= STRONGLY_TYPED_FROM
    if strongly_typed or info.dtype != "fp32":
        raise UserError(f"a {precision} engine needs a {precision} export here: TensorRT "
                        f"{system.tensorrt_version} builds the ONNX's own types and this export "
                        f"is {info.dtype}; export with --flavour plugin --dtype {precision}")
    return precision


def build_serialized_engine(spec: BuildSpec, info: ExportInfo, precision: str, profile: dict,
                            system: SystemInfo) -> bytes:
    """The TensorRT build, with Polygraphy's loaders; returns the serialised engine."""
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, ModifyNetworkOutputs,
                                        NetworkFromOnnxPath, Profile)
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from .progress import build_progress_monitor

    register_plugin_library(trt, spec.plugin)  # before parsing: the parser looks the node up there
    # TensorRT 10: an fp32 export lowered by builder flags needs a weakly typed network; any other
    # build takes the export's own types (strongly typed: without it TensorRT 10 may run an fp16
    # export's layers in fp32). TensorRT 11 is always strongly typed and ignores the flag.
    lowered = precision != info.dtype
    network = NetworkFromOnnxPath(str(spec.onnx_file), strongly_typed=not lowered)
    if spec.attention_outputs:  # for parity's per-head diagnostic
        network = ModifyNetworkOutputs(network, outputs=list(info.outputs) + info.attention_contexts)
    trt_profile = Profile()
    for name, (low, opt, high) in profile.items():
        trt_profile.add(name, min=low, opt=opt, max=high)
    config = CreateConfig(
        fp16=lowered and precision == "fp16", bf16=lowered and precision == "bf16",
        profiles=[trt_profile],
        memory_pool_limits=({trt.MemoryPoolType.WORKSPACE: spec.workspace_mb << 20}
                            if spec.workspace_mb else None),
        load_timing_cache=str(spec.timing_cache) if spec.timing_cache and spec.timing_cache.is_file() else None,
        progress_monitor=build_progress_monitor(trt))
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            return bytes(EngineBytesFromNetwork(
                network, config=config,
                save_timing_cache=str(spec.timing_cache) if spec.timing_cache else None)())
    except PolygraphyException as error:
        raise UserError(f"TensorRT could not build the engine: {first_line(error)}") from None
