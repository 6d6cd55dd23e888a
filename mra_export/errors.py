"""Errors a user can act on: the CLI prints them as one line, without a traceback."""

import argparse
import sys

from packaging.version import Version


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


def upgrade_fix(package: str, installed: str, needed: str) -> str | None:
    """The pip command that brings ``package`` from ``installed`` up to ``needed``, or ``None``
    where ``installed`` is already as new."""
    if Version(installed) >= Version(needed):
        return None
    return f"pip install --upgrade '{package}>={needed}'"


def warn(message: str) -> None:
    """A warning or note for the user, on stderr: stdout keeps the results (tables, reports)."""
    print(message, file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as the tool's own are (argparse puts its usage block
    first): the problem, and where the options are listed. Its subcommands' parsers are too."""

    commands: dict = {}  # a command's name -> its parser (the top-level parser's)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an option the command does not take is the command's error,
        pointing to its own --help (argparse leaves those to the top-level parser)."""
        words = sys.argv[1:] if args is None else list(args)
        parsed, unknown = self.parse_known_args(words, namespace)
        if unknown:
            command = getattr(parsed, "command", None)
            before_it = (command in words and unknown[0] in words
                         and words.index(unknown[0]) < words.index(command))
            parser = self if before_it else self.commands.get(command, self)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed
