"""``manifest.json``: what an engine was built with, and whether it fits the machine it meets.

A TensorRT engine only runs with the TensorRT version and GPU architecture it was built for,
and with the plugin library it was built against. The manifest records them; ``refusal``
compares them with the running system and says, in one line, what differs and how to rebuild.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import ClassVar

from ..export.info import ExportInfo
from ..files import JsonRecord, sha256_of
from .spec import AXIS_OF_DIMENSION

FILE_NAME = "manifest.json"
ENGINE_FILE = "model.plan"
FORMAT = "mra-export-engine/1"


@dataclasses.dataclass(frozen=True)
class SystemInfo:
    """The running system, as far as an engine cares."""
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclasses.dataclass
class EngineManifest(JsonRecord):
    FILE_NAME: ClassVar[str] = FILE_NAME
    MADE_BY: ClassVar[str] = "mra-export build"
    REDO: ClassVar[str] = "rebuild the engine"

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: list[dict]  # [{input: {"min": [...], "opt": [...], "max": [...]}}]
    attention_outputs: bool
    onnx: str
    plugin_library: str
    sha256: dict[str, str]  # "onnx", "plugin", "engine"
    export: dict  # the source's export.json
    build_seconds: float
    build_command: str
    mra_export_version: str
    engine_file: str = ENGINE_FILE
    format: str = FORMAT

    def problem(self) -> str | None:
        missing = [key for key in ("onnx", "plugin", "engine") if key not in self.sha256]
        if missing:
            return f"no sha256 for the {', '.join(missing)}"
        if Path(self.engine_file).name != self.engine_file:
            return f"{self.engine_file!r} is not a file name in the engine folder"
        if len(self.profiles) != 1 or any(
                not isinstance(shapes, dict) or not {"min", "opt", "max"} <= shapes.keys()
                for shapes in self.profiles[0].values()):
            return "profiles must be one profile of min, opt and max shapes per input"
        problem = ExportInfo.problem_of(self.export)
        return f"its export record: {problem}" if problem else None

    def rebuild_command(self, folder: str | Path) -> str:
        """The build command for this engine's export, precision, profile and outputs."""
        command = ["mra-export", "build", "--onnx", self.onnx, "--plugin", self.plugin_library,
                   "--precision", self.precision, "--shapes", self.shapes_flag()]
        if self.attention_outputs:
            command.append("--attention-outputs")
        return shlex.join([*command, "--out", str(folder)])

    def shapes_flag(self) -> str:
        """The profile as ``--shapes`` writes it: ``batch=1/1/8,sequence=1/128/512``."""
        profile = self.profiles[0]["input_ids"]
        dimensions = self.export["dynamic_axes"]["input_ids"].values()
        return ",".join(f"{AXIS_OF_DIMENSION[dimension]}={low}/{opt}/{high}" for dimension, low, opt, high
                        in zip(dimensions, profile["min"], profile["opt"], profile["max"]))

    def refusal(self, system: SystemInfo, folder: str | Path) -> str | None:
        """None when the engine fits ``system``; else one line saying what differs and how to
        rebuild. Checks the TensorRT version, the compute capability, the plugin library and the
        engine file against what the build recorded."""
        problems = []
        if system.tensorrt_version != self.tensorrt_version:
            problems.append(f"it was built with TensorRT {self.tensorrt_version}, this machine "
                            f"has {system.tensorrt_version}")
        if system.compute_capability != self.compute_capability:
            problems.append(f"it was built for compute capability {self.compute_capability} "
                            f"({self.gpu_name}), this GPU is {system.compute_capability} "
                            f"({system.gpu_name})")
        plugin = Path(self.plugin_library)
        if not plugin.is_file():
            problems.append(f"its plugin library {plugin} is missing")
        elif sha256_of(plugin) != self.sha256["plugin"]:
            problems.append(f"its plugin library {plugin} changed since the build (sha256 differs)")
        engine = Path(folder) / self.engine_file
        if not engine.is_file():
            problems.append(f"{engine} is missing")
        elif sha256_of(engine) != self.sha256["engine"]:
            problems.append(f"{engine} does not match its recorded sha256 (corrupt or replaced)")
        if not problems:
            return None
        return (f"cannot use the engine in {folder}: {'; '.join(problems)}. Rebuild it on this "
                f"machine: {self.rebuild_command(folder)}")
