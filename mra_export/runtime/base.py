"""What every runtime of an export shares: loading ``export.json`` and the call interface."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import load_config
from ..errors import InputError, UserError
from ..export.info import ExportInfo
from .model_io import ModelInputs, prepare_inputs, wrap_outputs


# What transformers' heads take to compute a loss (the QA head's positions, the others' labels).
LOSS_TARGETS = ("labels", "start_positions", "end_positions")


class ExportedModel:
    """An exported MRA head used like a transformers model: tokenizer output in, ModelOutput out.

    Subclasses run the model (``run_raw``); this class checks inputs and shapes the outputs.
    """

    def __init__(self, info: ExportInfo, config, folder: Path):
        # absolute: sessions made later (intermediate outputs, another provider) survive a chdir
        self.info, self.config, self.folder = info, config, Path(folder).absolute()
        self.task = info.task

    def check_graph_interface(self, inputs, outputs) -> None:
        """Refuse an export.json that does not describe the graph beside it (edited, or copied
        from another export): the checksums cover the graph, not export.json."""
        if set(inputs) != set(self.info.inputs) or not set(self.info.outputs) <= set(outputs):
            raise UserError(f"{self.folder / ExportInfo.FILE_NAME} does not describe "
                            f"{self.info.onnx_file} (its inputs are {', '.join(inputs)}; outputs "
                            f"{', '.join(outputs)}); export the model again")

    @staticmethod
    def load_export(folder: str | Path, verify: bool = True):
        """``export.json`` and ``config.json`` of an export folder, files checked by sha256."""
        if not isinstance(folder, (str, os.PathLike)):
            raise UserError(f"pass an export folder (made by mra-export export), got {folder!r}")
        info = ExportInfo.load(folder)
        if verify:
            info.verify_files(folder)
        config = load_config(folder)
        _check_config_matches(config, info, folder)
        return info, config

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *,
                 return_dict: bool | None = None, **kwargs):
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(flag, None):
                raise InputError(f"{flag} is not available from an exported model (its graph "
                                 "has the task's outputs only); use the PyTorch model for it")
        for name in LOSS_TARGETS:
            if kwargs.get(name) is not None:
                raise InputError(f"{name} is not taken by an exported model (its graph computes "
                                 "no loss); compute the loss from its outputs")
        inputs = prepare_inputs(self.info, self.config,
                                {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "token_type_ids": token_type_ids, **kwargs})
        outputs = wrap_outputs(self.info, self._run_for(inputs), inputs)
        return outputs.to_tuple() if return_dict is False else outputs

    def _run_for(self, inputs: ModelInputs) -> dict:
        """The outputs for checked ``inputs``: numpy arrays, or torch tensors where a runtime
        can hand them over on the inputs' device."""
        return self.run_raw(inputs.arrays)

    forward = __call__

    # What transformers' pipeline() reads of its model, as of Optimum's ORTModel, so that
    # pipeline("fill-mask", model=OrtMraModel.from_pretrained(...), tokenizer=...) works.
    input_modalities = ("text",)

    @property
    def device(self) -> torch.device:
        """Where the model wants its input tensors: host memory, whatever it computes on
        (onnxruntime and TensorRT copy inputs to the GPU themselves; CUDA tensors are taken too,
        and outputs come back on the inputs' device: from OrtMraModel on the CUDA provider
        without passing through the host)."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The outputs' type: the export's, bfloat16 widened to float32."""
        return torch.float16 if self.info.dtype == "fp16" else torch.float32

    def to(self, *args, device=None, dtype=None, non_blocking: bool = False):
        """As torch's ``Module.to`` (a device, a dtype, both, or a tensor's): compute on the
        device's kind of processor ("cpu", "cuda", or a GPU's index as in ``pipeline(device=0)``,
        -1 the CPU), or a one-line error where this runtime cannot; returns ``self``. A dtype is
        taken only if it is the export's own (it is fixed when the model is exported)."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, torch.Tensor):
                device, dtype = arg.device, arg.dtype
            else:
                device = arg
        if dtype is not None and dtype != self.dtype:
            raise UserError(f"this export computes in {self.info.dtype}, fixed when it was made; "
                            f"for {dtype} export again with --dtype")
        if device is not None:
            self._compute_on(_device_kind(device))
        return self

    def _compute_on(self, kind: str) -> None:
        if kind != "cpu":
            raise UserError(f"{type(self).__name__} computes on the CPU only, not on {kind}")

    def eval(self):
        return self  # inference only, always

    def can_generate(self) -> bool:
        return False

    @property
    def output_names(self) -> list[str]:
        return list(self.info.outputs)

    def run_raw(self, arrays: dict[str, np.ndarray], extra_outputs=()) -> dict[str, np.ndarray]:
        """Run on checked int64 arrays; ``extra_outputs`` names intermediate values (for
        example ``attention_context.0``) to return as well."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runtime holds beyond memory (a TensorRT engine's CUDA stream)."""


def _device_kind(device) -> str:
    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda" if device >= 0 else "cpu"  # transformers' pipeline(device=...): -1 the CPU
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None


def _check_config_matches(config, info: ExportInfo, folder) -> None:
    """config.json (which a user may edit, e.g. its labels) against the shapes the graph was
    exported with: the input checks read the config."""
    recorded = {"max_position_embeddings": info.max_sequence_length,
                "num_hidden_layers": info.attention.get("layers"),
                "num_attention_heads": info.attention.get("heads")}
    for name, exported in recorded.items():
        if exported is not None and getattr(config, name) != exported:
            raise UserError(f"{Path(folder) / 'config.json'} has {name}={getattr(config, name)} "
                            f"but the graph was exported with {exported}; restore the export's "
                            "config.json or export the model again")


class _PipelinesRunExportedModels(logging.Filter):
    """transformers' pipelines log an error for a model class missing from their lists of
    transformers' heads ("The model 'OrtMraModel' is not supported for text-classification.
    Supported models are [...]", some 150 names), then run it all the same. Exported models give
    them what a head gives (tests/test_ort_pipelines.py), so that record is dropped for them;
    for any other class it stays."""

    UNSUPPORTED = re.compile(r"The model '(\w+)' is not supported for ")

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.UNSUPPORTED.match(record.getMessage())
        return found is None or found.group(1) not in _exported_model_classes()


def _exported_model_classes(cls=ExportedModel) -> set[str]:
    """The names of ``cls``'s subclasses, at any depth (OrtMraModel, TrtMraModel, ...)."""
    names = set()
    for subclass in cls.__subclasses__():
        names |= {subclass.__name__, *_exported_model_classes(subclass)}
    return names


logging.getLogger("transformers.pipelines.base").addFilter(_PipelinesRunExportedModels())
