"""torch.onnx.export, quietly, with a failure as one line."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx_ir as ir
import torch

from ..errors import UserError


def onnx_graph(module: torch.nn.Module, inputs: dict, dynamic_shapes: dict, opset: int,
               output_names: list[str], translation_table: dict | None = None) -> ir.Model:
    """The graph of ``module(**inputs)``, traced by torch.export with ``dynamic_shapes`` and
    translated to ONNX at ``opset`` (``translation_table``: torch.onnx's custom translations)."""
    chatter = io.StringIO()  # the exporter prints its own progress lines
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), quiet_logger("torch"):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (), kwargs=inputs, dynamo=True, opset_version=opset,
                input_names=list(inputs), output_names=output_names,
                dynamic_shapes=dynamic_shapes, verbose=False,
                custom_translation_table=translation_table)
        except Exception as error:  # the exporter's report is long; keep its summary
            raise UserError(f"torch.onnx.export failed: {summary(error)}") from error
    return program.model


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


def summary(error: BaseException) -> str:
    """The line of a long error report that names the error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if "Error" in line or "error" in line]
    return (found[-1] if found else lines[-1] if lines else type(error).__name__)[:300]
