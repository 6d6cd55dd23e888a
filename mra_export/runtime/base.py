"""What every runtime of an export shares: loading ``export.json`` and the call interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoints import load_config
from ..export.info import ExportInfo
from .model_io import prepare_inputs, wrap_outputs


class ExportedModel:
    """An exported MRA head used like a transformers model: tokenizer output in, ModelOutput out.

    Subclasses run the model (``run_raw``); this class checks inputs and shapes the outputs.
    """

    def __init__(self, info: ExportInfo, config, folder: Path):
        self.info, self.config, self.folder = info, config, Path(folder)
        self.task = info.task

    @staticmethod
    def load_export(folder: str | Path, verify: bool = True):
        """``export.json`` and ``config.json`` of an export folder, files checked by sha256."""
        info = ExportInfo.load(folder)
        if verify:
            info.verify_files(folder)
        return info, load_config(folder)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        kwargs.pop("return_dict", None)
        inputs = prepare_inputs(self.info, self.config,
                                {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "token_type_ids": token_type_ids, **kwargs})
        return wrap_outputs(self.info, self.run_raw(inputs.arrays), inputs)

    forward = __call__

    @property
    def output_names(self) -> list[str]:
        return list(self.info.outputs)

    def run_raw(self, arrays: dict[str, np.ndarray], extra_outputs=()) -> dict[str, np.ndarray]:
        """Run on checked int64 arrays; ``extra_outputs`` names intermediate values (for
        example ``attention_context.0``) to return as well."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runtime holds beyond memory (a TensorRT engine's CUDA stream)."""
