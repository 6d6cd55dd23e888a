"""``export.json``: what an export folder holds, how it was made, and its checksums."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from ..errors import UserError, first_line
from ..files import JsonRecord, is_json_int, sha256_of

FILE_NAME = "export.json"
FORMAT = "mra-export/1"
FLAVOURS = ("portable", "plugin")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEFAULT_OPSET = 20
SUPPORTED_OPSETS = range(18, 24)  # 18: ScatterElements with reduction="max"
QUANTIZED_DTYPES = ("int8",)  # made from an fp32 export by mra-export quantize
QUANTIZE_MADE_BY = "mra-export quantize"


@dataclasses.dataclass
class ExportInfo(JsonRecord):
    FILE_NAME: ClassVar[str] = FILE_NAME
    MADE_BY: ClassVar[str] = "mra-export export"
    REDO: ClassVar[str] = "export the model again"

    flavour: str  # "portable" or "plugin"
    dtype: str  # "fp32", "fp16" or "bf16": the graph's weights and activations; "int8": int8
    # weight MatMuls, float32 activations (mra-export quantize)
    opset: int
    task: str  # Hugging Face task name
    model_class: str
    inputs: dict[str, str]  # name -> dtype
    outputs: dict[str, str]
    dynamic_axes: dict[str, dict[str, str]]  # tensor -> {axis index: axis name}
    max_sequence_length: int
    attention: dict  # the MRA settings of every layer, heads and head_dim
    attention_contexts: list[str]  # per-layer context values, for diagnostics
    versions: dict[str, str]
    onnx_file: str
    external_data: str | None
    sha256: dict[str, str]
    source: str
    plugin: dict | None = None  # the MraAttention node contract, plugin flavour only
    validation: dict | None = None  # onnxruntime vs PyTorch on a sample, portable flavour
    tokenizer: bool = False
    # int8 only: the scheme, the quantized nodes, the onnxruntime that quantized them
    quantization: dict | None = None
    format: str = FORMAT
    # How attention_contexts lie: "bhsd" [batch, heads, seq, head_dim]; the plugin flavour's are
    # its MraAttention nodes' outputs, "bshd" [batch, seq, heads, head_dim] (exports made before
    # that have none: "bhsd").
    attention_context_layout: str = "bhsd"

    def problem(self) -> str | None:
        from ..tasks import TASKS

        for field, value, allowed in (("task", self.task, tuple(TASKS)),
                                      ("flavour", self.flavour, FLAVOURS),
                                      ("dtype", self.dtype, DTYPE_NAMES + QUANTIZED_DTYPES),
                                      ("attention_context_layout", self.attention_context_layout,
                                       ("bhsd", "bshd"))):
            if value not in allowed:
                return f"unknown {field} {value!r}"
        return (self._attention_problem() or self._quantization_problem() or self._files_problem()
                or self._interface_problem(TASKS[self.task]))

    def _attention_problem(self) -> str | None:
        """The sizes the runtimes and quantize read from ``attention``: whole numbers >= 1."""
        for name in ("layers", "heads", "head_dim"):
            value = self.attention.get(name)
            if not is_json_int(value) or value < 1:
                return f"attention's {name} is {value!r}, not a whole number >= 1"
        return None

    def _quantization_problem(self) -> str | None:
        """An int8 export is a portable one with its quantization recorded; no other has one."""
        if self.dtype not in QUANTIZED_DTYPES:
            return None if self.quantization is None else f"a {self.dtype} export has quantization"
        if self.flavour != "portable":
            return f"dtype {self.dtype} with the {self.flavour} flavour"
        nodes = (self.quantization or {}).get("nodes")
        if not (isinstance(nodes, list) and nodes and all(isinstance(n, str) for n in nodes)):
            return f"dtype {self.dtype} without the quantized nodes"
        return None

    def _files_problem(self) -> str | None:
        """The graph's files must be in the folder and under checksum."""
        for name in filter(None, (self.onnx_file, self.external_data)):
            if Path(name).name != name:
                return f"{name!r} is not a file name in the export folder"
            if name not in self.sha256:
                return f"no sha256 for {name}"
        return None

    def _interface_problem(self, task) -> str | None:
        """What disagrees with the task's inputs and outputs (the graph's own are checked
        against these when a runtime loads it)."""
        if tuple(self.outputs) != task.outputs:
            return (f"outputs {list(self.outputs)} are not the {task.name} head's "
                    f"{list(task.outputs)}")
        if list(self.inputs)[:2] != ["input_ids", "attention_mask"] or not set(self.inputs) <= {
                "input_ids", "attention_mask", "token_type_ids"}:
            return f"inputs {list(self.inputs)} are not an MRA model's"
        for name, axes in [*((n, task.input_axes) for n in self.inputs),
                           *((n, task.output_axes) for n in self.outputs)]:
            given = list(self.dynamic_axes.get(name, {}).values())
            if given[:len(axes)] != list(axes):
                return f"dynamic_axes of {name} are {given}, not {list(axes)}"
        return None

    def onnx_path(self, folder: str | Path) -> Path:
        return Path(folder) / self.onnx_file

    def verify_files(self, folder: str | Path) -> None:
        """Refuse a folder whose ONNX files do not match the checksums recorded at export."""
        for name, expected in self.sha256.items():
            path = Path(folder) / name
            if not path.is_file():
                raise UserError(f"{path} is missing; export the model again")
            if sha256_of(path) != expected:
                raise UserError(f"{path} does not match the sha256 in {FILE_NAME} (changed or "
                                "corrupt); export the model again")


def read_graph(path: str | Path):
    """The ONNX graph at ``path`` without its external weights (names, types, shapes), or a
    one-line error where the file is not ONNX: a file cut short whose checksum export.json was
    given anew passes verify_files."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as error:
        raise UserError(f"{path} is not a readable ONNX graph ({first_line(error)}); export the "
                        "model again") from None
    if not model.graph.output:  # protobuf reads a file cut at a field's end, or empty, as whole
        raise UserError(f"{path} is not a readable ONNX graph (it has no outputs: cut short?); "
                        "export the model again")
    return model


def check_not_the_other_commands(out: str | Path, quantizing: bool) -> None:
    """export and quantize both write export.json, so either would take the other's output for
    an earlier one of its own and replace it: an int8 export is quantize's, any other export's."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((Path(out) / FILE_NAME).read_text())
        dtype = record.get("dtype") if isinstance(record, dict) else None
        if dtype is not None and (dtype in QUANTIZED_DTYPES) != quantizing:
            made_by = QUANTIZE_MADE_BY if dtype in QUANTIZED_DTYPES else ExportInfo.MADE_BY
            raise UserError(f"{out} is an output of '{made_by}' ({dtype}), which this command does "
                            "not replace; choose another output folder")
