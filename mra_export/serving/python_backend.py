"""What the python-backend models of ``mra-export triton`` do inside Triton's stub process.

``ExportServer`` runs an export with ``OrtMraModel``: the requests that Triton's dynamic batcher
hands over together are run as one batch and the results split back. ``TokenizerServer`` turns the
ensemble's strings into the model's inputs with the export's tokenizer. Both answer a bad request
with an error for that request alone. ``triton_python_backend_utils`` exists only in the stub, so
it is imported in ``serve``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .parameters import INPUTS, MAX_LENGTH, ROLE, TASK, text_inputs

# The tokenizer pads to a multiple of MRA's block: the model pads there itself (masked), so no
# answer changes, and requests whose lengths share a block have one shape, which is what Triton's
# dynamic batcher needs to merge them.
PAD_MULTIPLE = 32


def serve(args: dict, parameters: dict):
    """The server for one model instance (``args`` as the python backend's ``initialize``)."""
    import triton_python_backend_utils as pb_utils

    folder = Path(args["model_repository"]) / args["model_version"]
    if parameters[ROLE] == "tokenizer":
        return TokenizerServer(folder, parameters[TASK], parameters[INPUTS].split(","),
                               int(parameters[MAX_LENGTH]), pb_utils)
    return ExportServer(folder, _provider(args), pb_utils)


def _provider(args: dict):
    """The instance's kind: KIND_CPU computes on the CPU even where a GPU is present."""
    from ..runtime.ort import CPU, CUDA_FP32

    if args["model_instance_kind"] == "GPU":
        name, options = CUDA_FP32
        return name, {**options, "device_id": str(args["model_instance_device_id"])}
    return CPU


class ExportServer:
    def __init__(self, folder: Path, provider, pb_utils):
        from ..runtime.ort import OrtMraModel

        self.model = OrtMraModel.from_pretrained(folder, provider)
        self.pb = pb_utils

    def execute(self, requests) -> list:
        inputs = [{name: self.pb.get_input_tensor_by_name(request, name).as_numpy()
                   for name in self.model.info.inputs} for request in requests]
        try:
            outputs = self._run_together(inputs)
        except UserError:  # one bad request fails a merged run: each alone, each its answer
            return [self._answer_alone(arrays) for arrays in inputs]
        return [self._response(values) for values in outputs]

    def _run_together(self, inputs: list[dict]) -> list[dict]:
        shapes = {arrays["input_ids"].shape[1:] for arrays in inputs}
        if len(inputs) == 1 or len(shapes) != 1:
            return [self._run(arrays) for arrays in inputs]
        merged = self._run({name: np.concatenate([arrays[name] for arrays in inputs])
                            for name in inputs[0]})
        ends = np.cumsum([arrays["input_ids"].shape[0] for arrays in inputs])[:-1]
        parts = {name: np.split(values, ends) for name, values in merged.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(inputs))]

    def _run(self, arrays: dict) -> dict:
        outputs = self.model(**arrays)
        return {name: np.ascontiguousarray(outputs[name]) for name in self.model.info.outputs}

    def _answer_alone(self, arrays: dict):
        try:
            return self._response(self._run(arrays))
        except UserError as error:
            return self.pb.InferenceResponse(error=self.pb.TritonError(str(error)))

    def _response(self, values: dict):
        return self.pb.InferenceResponse(
            output_tensors=[self.pb.Tensor(name, array) for name, array in values.items()])


class TokenizerServer:
    def __init__(self, folder: Path, task: str, model_inputs: list[str], max_length: int,
                 pb_utils):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.task, self.model_inputs, self.max_length = task, model_inputs, max_length
        self.pb = pb_utils

    def execute(self, requests) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            texts = [self._strings(request, name) for name in text_inputs(self.task)]
            arrays = self.tokenize(*texts)
        except UserError as error:
            return self.pb.InferenceResponse(error=self.pb.TritonError(str(error)))
        return self.pb.InferenceResponse(
            output_tensors=[self.pb.Tensor(name, arrays[name]) for name in self.model_inputs])

    def tokenize(self, first: np.ndarray, second: np.ndarray | None = None) -> dict:
        """``[batch, 1]`` strings, with a second text per row (``[batch, 1]``) or a row's choices
        (``[batch, choices]``), as the model's int64 inputs: padded to the request's longest
        row rounded up to PAD_MULTIPLE (where the model's length is a multiple of it), cut at
        the model's length."""
        shape = (first.shape[0], -1)
        if self.task == "multiple-choice":  # the prompt before each of its choices
            shape = (first.shape[0], second.shape[1], -1)
            first = np.repeat(first, second.shape[1], axis=1)
        pairs = None if second is None else list(second.reshape(-1))
        multiple = PAD_MULTIPLE if self.max_length % PAD_MULTIPLE == 0 else None
        encoded = self.tokenizer(list(first.reshape(-1)), pairs, padding=True, truncation=True,
                                 max_length=self.max_length, pad_to_multiple_of=multiple,
                                 return_tensors="np",
                                 return_token_type_ids="token_type_ids" in self.model_inputs)
        return {name: encoded[name].astype(np.int64).reshape(shape) for name in self.model_inputs}

    def _strings(self, request, name: str) -> np.ndarray:
        values = self.pb.get_input_tensor_by_name(request, name).as_numpy()
        try:
            texts = [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                     for v in values.reshape(-1)]
        except UnicodeDecodeError:
            raise UserError(f"{name} is not UTF-8 text") from None
        return np.array(texts, dtype=object).reshape(values.shape)
