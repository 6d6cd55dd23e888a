"""Registering the ``MraAttention`` plugin library with TensorRT, once per process.

The library registers its creator only through ``getCreators``, which TensorRT calls from
``IPluginRegistry::loadLibrary`` (as ``trtexec --dynamicPlugins`` does); opening it with
``ctypes`` or ``dlopen`` alone registers nothing, and the ONNX parser then cannot find the node's
plugin (so nothing of the library calls TensorRT from inside ``loadLibrary``'s own dlopen). Triton,
which only dlopens, is given ``libmra_attention_plugin_triton.so`` instead, which registers the
creator when opened (``serving/triton.py``); never pass that one here. ``loadLibrary`` fails for
creators that are already registered, so each library is loaded once and remembered.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..native import check_interface_version

_loaded: dict[Path, object] = {}


def register_plugin_library(tensorrt, path: str | Path) -> None:
    """Load ``path`` into ``tensorrt``'s plugin registry, or say in one line why it cannot be."""
    path = Path(path).resolve()
    if path in _loaded:
        return
    if not path.is_file():
        raise UserError(f"plugin library {path} not found; build it with 'make plugins "
                        "TensorRT_ROOT=<TensorRT folder>'")
    check_interface_version(path)  # an older plugin would ignore the nodes' layout
    handle = tensorrt.get_plugin_registry().load_library(str(path))
    if handle is None:
        raise UserError(
            f"TensorRT could not load the plugin library {path} (its log above says why: a library "
            "built for another TensorRT or CUDA, or an MraAttention plugin already loaded from "
            "another file in this process); rebuild it here with 'make plugins "
            "TensorRT_ROOT=<TensorRT folder>' and load one copy per process")
    _loaded[path] = handle
