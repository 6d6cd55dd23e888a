"""``TrtMraModel``: a TensorRT engine folder (``mra-export build``) used like a transformers model.

Before anything is deserialised, the manifest is checked against this machine: TensorRT version,
GPU compute capability, plugin library and engine checksums. The engine runs through Polygraphy's
``TrtRunner`` (its own CUDA stream, device buffers reused between calls).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import load_config
from ..engines.availability import require_tensorrt
from ..engines.manifest import EngineManifest
from ..engines.plugin_library import register_plugin_library
from ..engines.spec import AXIS_OF_DIMENSION
from ..engines.system import fitting_manifest
from ..errors import InputError, UserError
from ..export.info import ExportInfo
from .base import ExportedModel


class TrtMraModel(ExportedModel):
    """An engine folder: ``model.plan``, ``manifest.json`` and the model's ``config.json``."""

    def __init__(self, info: ExportInfo, config, folder: Path, manifest: EngineManifest, engine):
        from polygraphy.backend.trt import TrtRunner

        super().__init__(info, config, folder)
        self.manifest = manifest
        self.runner = TrtRunner(engine, name=f"tensorrt-{manifest.precision}")
        self.runner.activate()

    @classmethod
    def from_engine(cls, folder: str | Path, verify: bool = True) -> TrtMraModel:
        """Load an engine folder; refuse it in one line if it does not fit this machine.
        ``verify=False`` skips that check (hashing the engine and plugin) for a caller that has
        just made it, as ``mra-export parity`` has."""
        if not isinstance(folder, (str, os.PathLike)):
            raise UserError(f"pass an engine folder (made by mra-export build), got {folder!r}")
        folder = Path(folder)
        if verify:
            manifest = fitting_manifest(folder, "TrtMraModel")  # TensorRT, a GPU, the same builds
        else:
            require_tensorrt("TrtMraModel")
            manifest = EngineManifest.load(folder)
        import tensorrt
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.exception import PolygraphyException

        register_plugin_library(tensorrt, manifest.plugin_library)
        try:
            engine = EngineFromBytes((folder / manifest.engine_file).read_bytes())()
        except PolygraphyException:  # Polygraphy raises where TensorRT returns None
            engine = None
        if engine is None:
            raise UserError(f"TensorRT could not deserialise {folder / manifest.engine_file}; "
                            f"rebuild it: {manifest.rebuild_command(folder)}")
        # manifest.json's load checked its export record (EngineManifest.problem)
        return cls(ExportInfo(**manifest.export), load_config(folder), folder, manifest, engine)

    def _compute_on(self, kind: str) -> None:
        if kind != "cuda":
            raise UserError(f"a TensorRT engine computes on its GPU, not on {kind}; use "
                            "OrtMraModel with a portable export there")

    def run_raw(self, arrays: dict[str, np.ndarray], extra_outputs=()) -> dict[str, np.ndarray]:
        if extra_outputs and not self.manifest.attention_outputs:
            raise UserError(f"the engine in {self.folder} has no attention outputs; rebuild it "
                            "with --attention-outputs for the per-head diagnostic")
        self._check_profile(arrays)
        # Torch inputs make Polygraphy return torch outputs, which (unlike numpy) hold bfloat16.
        outputs = self.runner.infer(feed_dict={name: torch.from_numpy(array)
                                               for name, array in arrays.items()})
        names = self.output_names + [n for n in extra_outputs if n not in self.output_names]
        return {name: host_copy(outputs[name]) for name in names}

    def _check_profile(self, arrays: dict[str, np.ndarray]) -> None:
        profile = self.manifest.profiles[0]
        for name, array in arrays.items():
            axes = list(self.info.dynamic_axes[name].values())
            limits = zip(axes, array.shape, profile[name]["min"], profile[name]["max"])
            for axis, size, low, high in limits:
                if not low <= size <= high:
                    flag = AXIS_OF_DIMENSION[axis]
                    raise InputError(f"{name} has {axis} {size}, outside this engine's profile "
                                     f"{low}..{high}; rebuild with --shapes {flag}=MIN/OPT/MAX "
                                     "covering it")

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()


def host_copy(value) -> np.ndarray:
    """A result the runner cannot overwrite (Polygraphy reuses, and may reallocate, its output
    buffers on the next call), bfloat16 widened to float32 (exact; numpy has no bfloat16)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy().copy()
    return np.array(value, copy=True)
