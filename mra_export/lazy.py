"""Package names imported on first use (PEP 562), so that the command line starts, takes Ctrl-C
and prints its help before torch, transformers or onnx are imported (seconds)."""

from __future__ import annotations

import importlib


def lazy_names(package: str, package_globals: dict, where: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``where`` is taken from the
    submodule it maps to (".attention"), imported when the name is first asked for."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    def __dir__() -> list[str]:
        return sorted({*package_globals, *where})

    return __getattr__, __dir__
