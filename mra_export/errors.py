"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names the problem and the fix."""


class InputError(UserError, ValueError):
    """Model inputs of the wrong type, rank, shape or range."""


class MissingTensorRT(UserError):
    """TensorRT (or a GPU for it) is not available on this machine."""

    def __init__(self, what: str = "this command"):
        super().__init__(
            f"{what} needs TensorRT, which is not installed here; on an NVIDIA machine run "
            "pip install 'mra-export[gpu]' (TensorRT's Python package and onnxruntime-gpu)")
