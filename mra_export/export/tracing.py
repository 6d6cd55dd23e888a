"""torch.onnx.export, quietly, with a failure as one line."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx_ir as ir
import onnxscript
import torch

from ..errors import UserError, upgrade_fix

# pyproject's bound. torch 2.11 and later import onnxscript._framework_apis.torch_2_11 (0.6 on),
# and before 0.7.1 onnxscript's constant folding could give two values one name, which its
# optimizer then refused in portable exports ("Initializer 'val_291' is already registered").
ONNXSCRIPT_FLOOR = "0.7.1"


def onnx_graph(module: torch.nn.Module, inputs: dict, dynamic_shapes: dict, opset: int,
               output_names: list[str], translation_table: dict | None = None) -> ir.Model:
    """The graph of ``module(**inputs)``, traced by torch.export with ``dynamic_shapes`` and
    translated to ONNX at ``opset`` (``translation_table``: torch.onnx's custom translations)."""
    check_onnxscript()
    # The exporter prints its progress to stdout and, when torch.export fails, the graph it
    # traced to stderr: the failure is told in one line instead.
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), \
            contextlib.redirect_stderr(chatter), quiet_logger("torch"):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (), kwargs=inputs, dynamo=True, opset_version=opset,
                input_names=list(inputs), output_names=output_names,
                dynamic_shapes=dynamic_shapes, verbose=False,
                custom_translation_table=translation_table)
        except Exception as error:
            raise UserError(f"torch.onnx.export failed: {root_cause(error)}") from error
    return program.model


def check_onnxscript() -> None:
    """Refuse, before tracing, an onnxscript older than the exports need (pip keeps the bound
    when it installs mra-export; a later install of another package may not)."""
    installed = onnxscript.__version__
    fix = upgrade_fix("onnxscript", installed, ONNXSCRIPT_FLOOR)
    if fix:
        raise UserError(f"onnxscript {installed} is older than exporting needs "
                        f"({ONNXSCRIPT_FLOOR}); {fix}")


@contextlib.contextmanager
def quiet_logger(logger_name: str):
    """Silence a library logger's notices (torch's exporter logs about torchvision; "" is the
    root logger, which onnxruntime.quantization logs to)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def root_cause(error: BaseException) -> str:
    """What went wrong first: torch.onnx wraps torch.export's error ("The error above occurred
    when calling torch.export.export"), whose first line names the problem."""
    if error.__cause__ is None:
        return summary(error)
    while error.__cause__ is not None:
        error = error.__cause__
    lines = _lines(str(error))
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def summary(error: BaseException) -> str:
    """The line of a long error report that names the error."""
    lines = _lines(str(error))
    found = [line for line in lines if "Error" in line or "error" in line]
    return (found[-1] if found else lines[-1] if lines else type(error).__name__)[:300]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
