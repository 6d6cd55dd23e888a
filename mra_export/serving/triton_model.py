"""The ``model.py`` that ``mra-export triton`` copies into a python-backend model's version folder.

Triton's python backend runs it in its stub process, whose Python sees no PYTHONPATH: so that it
imports this project and its packages (onnxruntime, transformers), it first puts the paths that
the repository's writer recorded in ``config.pbtxt`` (its environment's site-packages, the
project's folder) on ``sys.path``, then hands the model to ``mra_export.serving.python_backend``.
"""

import json
import os
import site
import sys

# Parameter names as mra_export.serving.triton writes them (it cannot be imported before this).
SYS_PATH, PYTHON = "mra_export_sys_path", "mra_export_python"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"]
                      for key, value in config.get("parameters", {}).items()}
        _check_python(parameters[PYTHON])
        _use_paths(parameters[SYS_PATH].split(os.pathsep))
        from mra_export.serving.python_backend import serve

        self.model = serve(args, parameters)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model = None


def _check_python(written_with: str) -> None:
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != written_with:
        raise RuntimeError(f"this model was written by Python {written_with} and its packages are "
                           f"for that Python, but the python backend's stub runs Python "
                           f"{running}; serve it with a stub for Python {written_with}")


def _use_paths(paths) -> None:
    """First on sys.path, and their .pth files read (an editable install's finder is one)."""
    sys.path[:0] = [path for path in paths if path not in sys.path]
    for path in paths:
        site.addsitedir(path)
