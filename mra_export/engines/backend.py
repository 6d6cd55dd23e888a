"""An engine as a parity backend: tolerances by precision, the per-head diagnostic if built in."""

from __future__ import annotations

from pathlib import Path

from ..parity.backends import Backend
from .manifest import EngineManifest

# Absolute tolerances on every output against the float32 PyTorch model (issue 5: logits).
ENGINE_TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def tensorrt_backend(folder: str | Path) -> Backend:
    """The engine in ``folder``, which run_parity has checked fits this machine (the loader
    does not hash it again)."""
    from ..runtime.trt import TrtMraModel

    manifest = EngineManifest.load(folder)
    return Backend(f"tensorrt-{manifest.precision}", str(folder),
                   ENGINE_TOLERANCES[manifest.precision],
                   load=lambda: TrtMraModel.from_engine(folder, verify=False),
                   attention=manifest.attention_outputs)
