"""Errors a user can act on: the CLI prints them as one line, without a traceback."""

import sys


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names the problem and the fix."""


class InputError(UserError, ValueError):
    """Model inputs or arguments of the wrong type, rank, shape, range or value."""


class InputTypeError(InputError, TypeError):
    """An input or argument of the wrong Python or tensor type: a TypeError, as Python's own
    are, and an InputError (a UserError) like the others."""


class MissingTensorRT(UserError):
    """TensorRT (or a GPU for it) is not available on this machine."""

    def __init__(self, what: str = "this command"):
        super().__init__(
            f"{what} needs TensorRT, which is not installed here; on an NVIDIA machine run "
            "pip install -e '.[gpu]' in the mra-export checkout (TensorRT's Python package and "
            "onnxruntime-gpu)")


def first_line(error: BaseException) -> str:
    """An exception's first line for a one-line message (its type's name when it has no text)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def warn(message: str) -> None:
    """A warning or note for the user, on stderr: stdout keeps the results (tables, reports)."""
    print(message, file=sys.stderr, flush=True)
