"""What the exported models take and give: tokenizer output in, the task's ModelOutput out.

Shared by the onnxruntime and TensorRT runtimes. Inputs may be numpy arrays, torch tensors or
lists (a tokenizer's output, unpacked); outputs come back as torch tensors when the inputs were
torch tensors, as numpy arrays otherwise. Missing ``attention_mask``/``token_type_ids`` default to
ones/zeros, as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..export.info import ExportInfo
from ..tasks import get_task

DEFAULTS = {"attention_mask": np.ones_like, "token_type_ids": np.zeros_like}


@dataclass
class ModelInputs:
    arrays: dict[str, np.ndarray]  # int64, C-contiguous, in the model's input order
    torch_device: torch.device | None  # where torch inputs lived; None for numpy inputs

    @property
    def batch(self) -> int:
        return self.arrays["input_ids"].shape[0]


def prepare_inputs(info: ExportInfo, config, given: dict) -> ModelInputs:
    """Check and convert the caller's inputs; raise ``InputError`` naming any problem."""
    given = dict(given)
    if "token_type_ids" not in info.inputs and _zeros_like_ids(given.get("token_type_ids"),
                                                               given.get("input_ids")):
        del given["token_type_ids"]  # what the graph uses anyway (the config has one type)
    unknown = sorted(name for name, value in given.items()
                     if value is not None and name not in info.inputs)
    if unknown:
        raise InputError(f"unexpected input {', '.join(unknown)}; this {info.task} model takes "
                         f"{', '.join(info.inputs)}")
    if given.get("input_ids") is None:
        raise InputError(f"input_ids is required (the {info.task} model takes "
                         f"{', '.join(info.inputs)})")
    device = next((v.device for v in given.values() if isinstance(v, torch.Tensor)), None)
    ids = _as_int64("input_ids", given["input_ids"], allow_float=False)
    _check_rank("input_ids", ids, info)
    arrays = {"input_ids": ids}
    for name in info.inputs:
        if name == "input_ids":
            continue
        value = given.get(name)
        array = DEFAULTS[name](ids) if value is None else _as_int64(name, value, allow_float=True)
        if array.shape != ids.shape:
            raise InputError(f"{name} has shape {list(array.shape)} but input_ids has "
                             f"{list(ids.shape)}; they must match")
        arrays[name] = array
    _check_length(ids, config.max_position_embeddings)
    _check_range("input_ids", ids, config.vocab_size)
    if "token_type_ids" in arrays:
        _check_range("token_type_ids", arrays["token_type_ids"], config.type_vocab_size)
    return ModelInputs(arrays, device)


def _zeros_like_ids(value, ids) -> bool:
    """Whether ``value`` is all zeros in the shape of ``ids`` (a tokenizer's token_type_ids)."""
    if value is None or ids is None:
        return False
    try:
        value = _as_int64("token_type_ids", value, allow_float=True)
        ids = _as_int64("input_ids", ids, allow_float=False)
    except InputError:
        return False  # ragged or odd: reported with the other inputs
    return value.shape == ids.shape and not value.any()


def wrap_outputs(info: ExportInfo, values: dict, inputs: ModelInputs):
    """The task's transformers ``ModelOutput`` of ``values`` (numpy arrays or torch tensors),
    in torch on the inputs' device when the inputs were torch."""
    task = get_task(info.task)
    if inputs.torch_device is not None:
        values = {name: (v if isinstance(v, torch.Tensor)
                         else torch.from_numpy(np.ascontiguousarray(v))).to(inputs.torch_device)
                  for name, v in values.items()}
    return task.output_type(**{name: values[name] for name in task.outputs})


def _as_int64(name: str, value, allow_float: bool) -> np.ndarray:
    array = _as_array(name, value)
    if array.size == 0:
        return array.astype(np.int64)  # an empty list is float64 to numpy; reported as empty
    if array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name} holds {array.max()}, past int64's range")
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64, order="C", copy=False)
    if allow_float and np.issubdtype(array.dtype, np.floating):
        is_01 = np.isin(array, (0, 1))
        if is_01.all():
            return array.astype(np.int64, order="C")  # a 0/1 mask given as floats
        raise InputError(f"{name} must hold 0 and 1, got {array[~is_01].flat[0]} ({array.dtype})")
    raise InputError(f"{name} must hold integers, got {array.dtype}")


def _as_array(name: str, value) -> np.ndarray:
    if isinstance(value, Mapping):
        raise InputError(f"{name} is a mapping (a tokenizer's whole output?); pass it unpacked: "
                         "model(**encoding)")
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise InputError(f"{name} is a {value.layout} tensor; pass a dense one (.to_dense())")
        if value.is_meta:
            raise InputError(f"{name} is a meta tensor, which holds no values; pass one that does")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        value = value.numpy()
    huge = _integer_past_int64(value)
    if huge is not None:  # numpy would make it uint64, float64 or an object
        raise InputError(f"{name} holds {huge}, past int64's range")
    try:
        array = np.asarray(value)
    except ValueError:  # numpy refuses some ragged lists, and makes objects of others
        array = None
    if array is None or array.dtype == object:
        raise InputError(f"{name} is ragged; pad the batch (tokenizer(..., padding=True))")
    return array


def _integer_past_int64(value) -> int | None:
    """The first Python integer in a (nested) list that int64 cannot hold, None if none."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if -2**63 <= value < 2**63 else value
    if isinstance(value, (list, tuple)):
        return next((huge for huge in map(_integer_past_int64, value) if huge is not None), None)
    return None


def _check_rank(name: str, array: np.ndarray, info: ExportInfo) -> None:
    axes = list(info.dynamic_axes[name].values())
    if array.ndim != len(axes):
        raise InputError(f"{name} must be [{', '.join(axes)}], got shape {list(array.shape)}")
    if 0 in array.shape:
        raise InputError(f"{name} is empty (shape {list(array.shape)})")


def _check_length(ids: np.ndarray, max_length: int) -> None:
    if ids.shape[-1] > max_length:
        raise InputError(f"sequence length {ids.shape[-1]} is longer than the model's "
                         f"max_position_embeddings={max_length}; truncate the input, e.g. "
                         f"tokenizer(..., truncation=True, max_length={max_length})")


def _check_range(name: str, array: np.ndarray, size: int) -> None:
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= size:
        raise InputError(f"{name} must be in [0, {size}) for this model, got values "
                         f"{low}..{high}")
