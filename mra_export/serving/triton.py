"""``mra-export triton``: a Triton Inference Server model repository for an export or an engine.

Laid out as Triton's documentation has it::

    REPO/NAME/config.pbtxt             backend onnxruntime (exports), tensorrt (engines) or python
    REPO/NAME/1/model.onnx|model.plan  with export.json or manifest.json and config.json
    REPO/NAME/1/model.py               python backend: OrtMraModel on the export beside it
    REPO/NAME/lib*.so                  the op library (plugin flavour), or the TensorRT plugin
                                       and the triton library that registers it (engines)
    REPO/NAME_tokenizer/               python backend: raw strings to the model's inputs
    REPO/NAME_text/config.pbtxt        ensemble: tokenizer, then NAME

Inputs and outputs take their names, types and dynamic dimensions from ``export.json`` (an
engine's manifest carries its export's), their fixed sizes from ``config.json`` (checked against
the graph). Every ``config.pbtxt`` is checked against Triton's ``model_config.proto``
(``schema``) before anything is written; each model folder is staged and renamed, so a failure
leaves ``REPO`` as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from .. import __version__
from ..checkpoints import TOKENIZER_FILES, load_config
from ..errors import UserError
from ..export.info import ExportInfo, read_graph
from ..files import absolute, staged_folder
from ..native import TRITON_PLUGIN_LIBRARY
from . import schema
from .arguments import DEFAULT_MAX_BATCH_SIZE, DEVICES, EXPORT_BACKENDS
from .parameters import INPUTS, MANY_STRINGS, MAX_LENGTH, PYTHON, ROLE, SYS_PATH, TASK, text_inputs

INT32_MAX = 2**31 - 1  # model_config.proto's max_batch_size and instance counts
MAX_QUEUE_DELAY_US = 1000  # how long a request may wait for others to fill a batch
VERSION = "1"
MARKER = "mra-export-triton.json"  # in every model folder this command writes
TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "bfloat16": "TYPE_BF16"}
# Names every client reaches: a folder name, an HTTP path segment and a gRPC string alike.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
TOKENIZER_SUFFIX, TEXT_SUFFIX = "_tokenizer", "_text"
# The config.json field that sizes a head's outputs after their dynamic axes (others have none).
FIXED_SIZE_FIELDS = {"feature-extraction": "hidden_size", "fill-mask": "vocab_size",
                     "text-classification": "num_labels", "token-classification": "num_labels"}


@dataclasses.dataclass
class Source:
    """A checked export or engine folder, and how Triton serves it."""
    folder: Path
    info: ExportInfo
    config: object  # MraConfig: the outputs' fixed sizes
    backend: str  # onnxruntime, tensorrt or python
    files: list[str]  # copied into REPO/NAME/1
    library: Path | None  # the op library (plugin-flavour ONNX), or the triton library (engines)
    max_batch_size: int  # the default, and for engines the profile's limit
    tokenizer_files: list[str]
    companions: list[Path] = dataclasses.field(default_factory=list)  # copied beside library


def write_repository(repo: str | Path, *, onnx: str | Path | None = None,
                     engine: str | Path | None = None, name: str | None = None,
                     max_batch_size: int | None = None, instances: int = 1,
                     device: str | None = None, backend: str | None = None,
                     log=print) -> list[Path]:
    """Write ``REPO/NAME`` (and, where the folder has tokenizer files, ``NAME_tokenizer`` and the
    ensemble ``NAME_text``) for the export ``onnx`` or the engine folder ``engine``; returns the
    model folders written. Everything is checked before anything is written."""
    source = _export_source(onnx, backend) if engine is None else _engine_source(engine, backend)
    name = _checked_name(name if name is not None else source.folder.name)
    device = device or ("gpu" if source.backend == "tensorrt" else "cpu")
    batch = _checked_counts(source, max_batch_size, instances, device)
    repo = absolute(repo)
    model_dir = repo / name
    configs = {name: model_config(source, name, batch, instances, device, model_dir)}
    if source.tokenizer_files:
        configs[name + TOKENIZER_SUFFIX] = tokenizer_config(source.info, name, batch)
        configs[name + TEXT_SUFFIX] = ensemble_config(source.info, source.config, name, batch)
    texts = {model: schema.config_text(config, repo / model / schema.CONFIG_FILE)
             for model, config in configs.items()}
    for model, text in texts.items():  # as Triton will read them
        schema.check_config_text(text, repo / model / schema.CONFIG_FILE)
    _check_not_anothers(repo, name, texts)
    written = _write(repo, name, source, texts)
    for folder in written:
        log(f"wrote {folder}")
    log(f"serve it: {serve_command(repo, name, source)}")
    if source.tokenizer_files and source.backend != "python":
        log(f"({name}{TOKENIZER_SUFFIX} is a python-backend model: that Triton's python backend "
            f"must run Python {sys.version_info.major}.{sys.version_info.minor} with this "
            "environment's packages)")
    return written


def _export_source(folder, backend: str | None) -> Source:
    folder = _folder(folder, "--onnx")
    info = ExportInfo.load(folder)
    info.verify_files(folder)
    config = load_config(folder)
    _check_config_fits_graph(info.onnx_path(folder), info, config)
    backend = backend or "onnxruntime"
    if backend not in EXPORT_BACKENDS:
        raise UserError(f"an export is served by the {' or '.join(EXPORT_BACKENDS)} backend, not "
                        f"{backend}")
    library = None
    if info.flavour == "plugin":  # its MraAttention nodes run through the op library
        from ..runtime.ort import op_library_path

        library = op_library_path()  # one line naming `make plugins` where it is not built
        if backend == "python":
            library = None  # OrtMraModel opens it where `make plugins` put it
    files = [ExportInfo.FILE_NAME, "config.json", *sorted(info.sha256)]
    return Source(folder, info, config, backend, files, library, DEFAULT_MAX_BATCH_SIZE,
                  _tokenizer_files(folder))


def _engine_source(folder, backend: str | None) -> Source:
    from ..engines.manifest import EngineManifest
    from ..engines.system import current_system

    folder = _folder(folder, "--engine")
    if backend not in (None, "tensorrt"):
        raise UserError(f"an engine is served by Triton's tensorrt backend, not {backend}; "
                        "--backend python serves an export (--onnx)")
    manifest = EngineManifest.load(folder)
    refusal = manifest.refusal(current_system("mra-export triton --engine"), folder)
    if refusal:  # the checks TrtMraModel.from_engine makes
        raise UserError(refusal)
    info = ExportInfo(**manifest.export)
    files = [manifest.engine_file, EngineManifest.FILE_NAME, "config.json"]
    profile_batch = manifest.profiles[0]["input_ids"]["max"][0]
    plugin = Path(manifest.plugin_library)
    return Source(folder, info, load_config(folder), "tensorrt", files, _triton_library(plugin),
                  profile_batch, _tokenizer_files(folder), companions=[plugin])


def _check_config_fits_graph(onnx_path: Path, info: ExportInfo, config) -> None:
    """config.pbtxt takes the outputs' fixed sizes from config.json, which is not under checksum
    (its labels' names may be edited): refuse one whose sizes are no longer the graph's."""
    graph = read_graph(onnx_path).graph
    for output in graph.output:
        if output.name not in info.outputs:
            continue
        dims = output.type.tensor_type.shape.dim
        graph_sizes = [d.dim_value for d in dims[len(info.dynamic_axes[output.name]):]]
        if graph_sizes != fixed_sizes(info.task, config):
            field = FIXED_SIZE_FIELDS[info.task]
            exported = ", ".join(map(str, graph_sizes))
            raise UserError(f"{onnx_path.parent / 'config.json'} has {field}="
                            f"{getattr(config, field)} but the graph's {output.name} were "
                            f"exported with {exported}; restore the export's config.json or "
                            "export the model again")


def _triton_library(plugin: Path) -> Path:
    """The library Triton's tensorrt backend is given for the engine's ``plugin``: the backend
    only dlopens plugin libraries, and the plugin library registers its creator only through
    getCreators (as TensorRT's loadLibrary wants); the triton library beside it registers that
    creator when opened, and loads the plugin library from its own folder."""
    path = plugin.with_name(TRITON_PLUGIN_LIBRARY)
    if not path.is_file():
        raise UserError(f"{path} is not built, and Triton's tensorrt backend loads the plugin "
                        f"through it (it registers {plugin.name}'s creator when opened): run "
                        "'make plugins TensorRT_ROOT=<TensorRT folder>'")
    return path


def _folder(folder, flag: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass the folder that mra-export "
                        f"{'export' if flag == '--onnx' else 'build'} wrote")
    return folder


def _tokenizer_files(folder: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _checked_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise UserError(f"model name {name!r} is not one Triton serves over HTTP and gRPC alike "
                        "(1-100 letters, digits, '_', '-' or '.', starting with a letter or "
                        "digit); pass --name")
    return name


def _checked_counts(source: Source, max_batch_size, instances: int, device: str) -> int:
    batch = source.max_batch_size if max_batch_size is None else max_batch_size
    if not 1 <= batch <= INT32_MAX:
        raise UserError(f"--max-batch-size must be 1 to {INT32_MAX} (Triton's int32), got "
                        f"{batch}")
    if batch > source.max_batch_size and source.backend == "tensorrt":
        raise UserError(f"--max-batch-size {batch} is above the engine's profile (batch up to "
                        f"{source.max_batch_size}); pass at most that, or rebuild with a larger "
                        "--shapes batch=")
    if not 1 <= instances <= INT32_MAX:
        raise UserError(f"--instances must be 1 to {INT32_MAX} (Triton's int32), got {instances}")
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if source.backend == "tensorrt" and device != "gpu":
        raise UserError("a TensorRT engine runs on its GPU: --device gpu (or leave it out)")
    if source.backend == "python":
        _check_runs_here(source.info, device)
    elif source.backend == "onnxruntime":
        _check_onnxruntime_runs(source.info, device)
    return batch


def _check_onnxruntime_runs(info: ExportInfo, device: str) -> None:
    """What OrtMraModel refuses too (choose_providers), for Triton's onnxruntime backend: int8 on a
    GPU (its quantized MatMuls are CPU kernels), bfloat16 on the CPU (onnxruntime's CPU provider
    lacks its kernels). How that backend itself would take them is not tried here: this
    project's tritonserver has the python backend only."""
    if info.dtype == "int8" and device == "gpu":
        raise UserError("this export is int8: onnxruntime computes its dynamically quantized "
                        "MatMuls on the CPU only; pass --device cpu, or serve the fp32/fp16 export "
                        "on the GPU")
    if info.dtype == "bf16" and device == "cpu":
        raise UserError("this export is bfloat16: onnxruntime's CPU provider lacks bfloat16 kernels "
                        "for this graph; pass --device gpu, or serve an fp32/fp16 export")


def _check_runs_here(info: ExportInfo, device: str) -> None:
    """The python model runs OrtMraModel in this environment: refuse now what it would refuse
    when the server loads it (no CUDA provider, bfloat16 on the CPU)."""
    from ..runtime.ort import CPU, CUDA_FP32, choose_providers

    choose_providers(CUDA_FP32 if device == "gpu" else CPU, info.dtype)


def model_config(source: Source, name: str, max_batch_size: int, instances: int, device: str,
                 model_dir: Path) -> dict:
    """The model's config.pbtxt, as a dict of model_config.proto's fields."""
    info = source.info
    config = {
        "name": name, "backend": source.backend, "max_batch_size": max_batch_size,
        "input": [tensor(n, info.inputs[n], input_dims(info, n)) for n in info.inputs],
        "output": [tensor(n, _served_type(source, dtype), output_dims(info, source.config, n))
                   for n, dtype in info.outputs.items()],
        "instance_group": [{"count": instances, "kind": DEVICES[device]}],
    }
    if max_batch_size > 1:
        config["dynamic_batching"] = {"preferred_batch_size": preferred_batch_sizes(max_batch_size),
                                      "max_queue_delay_microseconds": MAX_QUEUE_DELAY_US}
    if source.backend == "onnxruntime" and info.onnx_file != "model.onnx":
        config["default_model_filename"] = info.onnx_file
    if source.backend == "onnxruntime" and source.library is not None:
        # Triton opens the library by this path: the copy in the model's folder
        config["model_operations"] = {"op_library_filename": [str(model_dir / source.library.name)]}
    if source.backend == "python":
        config["parameters"] = python_parameters("model")
    return config


def tokenizer_config(info: ExportInfo, name: str, max_batch_size: int) -> dict:
    """The python model that turns the ensemble's strings into the model's inputs."""
    return {
        "name": name + TOKENIZER_SUFFIX, "backend": "python", "max_batch_size": max_batch_size,
        "input": [tensor(n, "string", string_dims(n)) for n in text_inputs(info.task)],
        "output": [tensor(n, info.inputs[n], input_dims(info, n)) for n in info.inputs],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": python_parameters("tokenizer", **{
            TASK: info.task, INPUTS: ",".join(info.inputs), MAX_LENGTH: info.max_sequence_length}),
    }


def ensemble_config(info: ExportInfo, config, name: str, max_batch_size: int) -> dict:
    """``NAME_text``: strings in, the model's outputs and the token ids out."""
    tokenizer, texts = name + TOKENIZER_SUFFIX, text_inputs(info.task)
    outputs = [tensor(n, dtype, output_dims(info, config, n)) for n, dtype in info.outputs.items()]
    return {
        "name": name + TEXT_SUFFIX, "platform": "ensemble", "max_batch_size": max_batch_size,
        "input": [tensor(n, "string", string_dims(n)) for n in texts],
        "output": [*outputs, tensor("input_ids", "int64", input_dims(info, "input_ids"))],
        "ensemble_scheduling": {"step": [
            {"model_name": tokenizer, "model_version": -1, "input_map": {n: n for n in texts},
             "output_map": {n: n for n in info.inputs}},
            {"model_name": name, "model_version": -1, "input_map": {n: n for n in info.inputs},
             "output_map": {n: n for n in info.outputs}},
        ]},
    }


def tensor(name: str, dtype: str, dims: list[int]) -> dict:
    type_name = "TYPE_STRING" if dtype == "string" else TRITON_TYPES.get(dtype)
    if type_name is None:
        raise UserError(f"tensor {name} has type {dtype}, which this command does not map to "
                        "Triton; export the model again")
    return {"name": name, "data_type": type_name, "dims": dims}


def _served_type(source: Source, dtype: str) -> str:
    """OrtMraModel gives a bfloat16 export's outputs as float32 (numpy has no bfloat16)."""
    return "float32" if source.backend == "python" and dtype == "bfloat16" else dtype


def input_dims(info: ExportInfo, name: str) -> list[int]:
    """Every axis of an input is dynamic; Triton's batch axis (the first) is implied."""
    return [-1] * (len(info.dynamic_axes[name]) - 1)


def output_dims(info: ExportInfo, config, name: str) -> list[int]:
    """The dynamic axes after the batch, then the head's fixed sizes from config.json."""
    return [-1] * (len(info.dynamic_axes[name]) - 1) + fixed_sizes(info.task, config)


def fixed_sizes(task: str, config) -> list[int]:
    """The sizes after an output's dynamic axes: hidden states, vocabulary or labels."""
    field = FIXED_SIZE_FIELDS.get(task)
    return [getattr(config, field)] if field else []


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 2, and the maximum: the batcher sends one of these when it can."""
    sizes = {1 << k for k in range(1, max_batch_size.bit_length()) if 1 << k <= max_batch_size}
    return sorted(sizes | {max_batch_size})


def string_dims(name: str) -> list[int]:
    return [-1] if name in MANY_STRINGS else [1]


def python_parameters(role: str, **recorded) -> dict:
    """What a python model needs in the stub: its role, this environment's packages and the
    project (the stub sees no PYTHONPATH), this Python's version (the stub must embed the same),
    and what the role reads (``recorded``, named by parameters.py's constants)."""
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                           str(Path(__file__).resolve().parents[2])])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    values = {ROLE: role, SYS_PATH: os.pathsep.join(paths), PYTHON: version, **recorded}
    return {key: {"string_value": str(value)} for key, value in values.items()}


def _write(repo: Path, name: str, source: Source, texts: dict[str, str]) -> list[Path]:
    """Every model folder staged, then each renamed into place; on any error none is."""
    with contextlib.ExitStack() as stack:
        staged = {model: stack.enter_context(staged_folder(repo / model, MARKER,
                                                           inputs=[source.folder]))
                  for model in texts}
        for model, staging in staged.items():
            (staging / schema.CONFIG_FILE).write_text(texts[model])
            _record(staging, source, name)
        _fill_model(staged[name], source)
        if source.tokenizer_files:
            _fill_tokenizer(staged[name + TOKENIZER_SUFFIX], source)
            (staged[name + TEXT_SUFFIX] / VERSION).mkdir()  # an ensemble's version is empty
    _remove_stale_companions(repo, name, written=texts)
    return [repo / model for model in texts]


def _fill_model(staging: Path, source: Source) -> None:
    version = staging / VERSION
    version.mkdir()
    for file in dict.fromkeys(source.files):
        shutil.copy2(source.folder / file, version / file)
    for library in [source.library, *source.companions]:  # the repository carries what it needs
        if library is not None:
            shutil.copy2(library, staging / library.name)
    if source.backend == "python":
        shutil.copy2(Path(__file__).with_name("triton_model.py"), version / "model.py")


def _fill_tokenizer(staging: Path, source: Source) -> None:
    version = staging / VERSION
    version.mkdir()
    for file in source.tokenizer_files:
        shutil.copy2(source.folder / file, version / file)
    shutil.copy2(Path(__file__).with_name("triton_model.py"), version / "model.py")


def _marker_owner(folder: Path) -> str | None:
    """The model (--name) this command wrote ``folder`` for, by its marker; None where it has no
    readable one."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((folder / MARKER).read_text())
        return record.get("model") if isinstance(record, dict) else None
    return None


def _check_not_anothers(repo: Path, name: str, models) -> None:
    """A folder this command wrote for another model (model a's ensemble a_text, say) is not
    this run's to replace, though its marker would let staged_folder replace it."""
    for model in models:
        owner = _marker_owner(repo / model)
        if owner not in (None, name):
            raise UserError(f"{repo / model} belongs to model {owner} of this repository "
                            f"(mra-export triton --name {owner}); choose another --name")


def _record(staging: Path, source: Source, name: str) -> None:
    """The marker: this command wrote the folder (so a later run may replace it), from what."""
    (staging / MARKER).write_text(json.dumps({
        "made_by": "mra-export triton", "model": name, "source": str(absolute(source.folder)),
        "backend": source.backend, "mra_export_version": __version__}, indent=2))


def _remove_stale_companions(repo: Path, name: str, written) -> None:
    """An earlier run's tokenizer and ensemble of ``name`` that this run did not rewrite (its
    source has no tokenizer): they would feed the new model what the old one took."""
    for model in (name + TOKENIZER_SUFFIX, name + TEXT_SUFFIX):
        if model not in written and _marker_owner(repo / model) == name:
            with contextlib.suppress(OSError):
                shutil.rmtree(repo / model)


def serve_command(repo: Path, name: str, source: Source) -> str:
    """How to start a server for the repository."""
    if source.backend == "python":  # with this environment, by the server of make triton-server
        return shlex.join([sys.executable, "-m", "mra_export.serving.server", "--repo", str(repo)])
    command = ["tritonserver", f"--model-repository={repo}"]
    if source.backend == "tensorrt":  # dlopened: the triton library registers the plugin beside it
        command.append(f"--backend-config=tensorrt,plugins={repo / name / source.library.name}")
    return shlex.join(command)


def run_triton_from_args(args) -> list[Path]:
    return write_repository(args.repo, onnx=args.onnx, engine=args.engine, name=args.name,
                            max_batch_size=args.max_batch_size, instances=args.instances,
                            device=args.device, backend=args.backend)
