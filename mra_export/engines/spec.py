"""Engine build specs: what ``mra-export build`` builds, from a JSON file, flags, or both.

A spec (``engines/specs/*.json``) names the export, the plugin, the precision and the
optimisation profile; command-line flags override its values. Relative paths are relative to the
working directory (the repository root for the shipped specs).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from ..errors import UserError
from ..export.info import DTYPE_NAMES, ExportInfo
from ..files import is_json_int

PRECISIONS = DTYPE_NAMES
AXES = ("batch", "sequence", "choices")
AXIS_OF_DIMENSION = {"batch_size": "batch", "sequence_length": "sequence", "num_choices": "choices"}
KEYS = ("onnx", "plugin", "out", "precision", "shapes", "timing_cache", "workspace_mb",
        "attention_outputs")


@dataclasses.dataclass
class BuildSpec:
    onnx: Path  # model.onnx of a plugin-flavour export (or its folder)
    out: Path  # the engine folder
    plugin: Path
    precision: str | None = None  # None: the export's dtype
    shapes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    timing_cache: Path | None = None
    workspace_mb: int | None = None
    attention_outputs: bool = False

    @property
    def export_folder(self) -> Path:
        return self.onnx if self.onnx.is_dir() else self.onnx.parent

    @property
    def onnx_file(self) -> Path:
        return self.onnx / "model.onnx" if self.onnx.is_dir() else self.onnx

    def profile(self, info: ExportInfo) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max shapes of every input, bounded by max_position_embeddings."""
        limit = info.max_sequence_length
        axes = {"batch": (1, 1, 8), "sequence": (1, min(128, limit), limit), "choices": (1, 2, 4)}
        axes.update(self.shapes)
        if axes["sequence"][2] > limit:
            raise UserError(f"sequence max {axes['sequence'][2]} is past the model's "
                            f"max_position_embeddings={limit}; use --shapes sequence=MIN/OPT/{limit}")
        names = list(info.dynamic_axes["input_ids"].values())
        order = ["batch", "choices", "sequence"] if "num_choices" in names else ["batch", "sequence"]
        shape = tuple(zip(*(axes[axis] for axis in order)))  # ((min...), (opt...), (max...))
        return {name: shape for name in info.inputs}


def parse_shapes(text: str) -> dict[str, tuple[int, int, int]]:
    """``batch=1/4/8,sequence=1/128/512`` -> {"batch": (1, 4, 8), ...}."""
    shapes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\w+)=(\d+)/(\d+)/(\d+)", item)
        if not match or match[1] not in AXES:
            raise UserError(f"--shapes: cannot read {item!r}; write AXIS=MIN/OPT/MAX with AXIS one "
                            f"of {', '.join(AXES)}, e.g. batch=1/4/8,sequence=1/128/512")
        if match[1] in shapes:
            raise UserError(f"--shapes: {match[1]} is given twice; give each axis once")
        shapes[match[1]] = _checked_range(match[1], [int(match[i]) for i in (2, 3, 4)])
    return shapes


def load_spec_file(path: str | Path, overridden=frozenset()) -> dict:
    """The spec's values, checked; keys (and ``shapes.AXIS``) in ``overridden`` are replaced on
    the command line, so theirs are not checked: a flag can fix a bad value in a spec."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"spec {path} is a folder; pass a spec file (engines/*.json)")
    if not path.is_file():
        raise UserError(f"spec {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not text at all
        raise UserError(f"spec {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"spec {path} must be a JSON object of {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UserError(f"spec {path}: unknown key {', '.join(unknown)} (allowed: {', '.join(KEYS)})")
    data = {key: value for key, value in data.items() if key not in overridden}
    for key in ("onnx", "out", "plugin", "timing_cache", "precision"):
        if not isinstance(data.get(key, ""), str):
            raise UserError(f"spec {path}: {key} must be a string, got {json.dumps(data[key])}")
    if not isinstance(data.get("attention_outputs", False), bool):
        raise UserError(f"spec {path}: attention_outputs must be true or false, got "
                        f"{json.dumps(data['attention_outputs'])}")
    if "shapes" in data:
        if not isinstance(data["shapes"], dict):
            raise UserError(f"spec {path}: shapes must be an object like "
                            '{"batch": [1, 4, 8], "sequence": [1, 128, 512]}')
        data["shapes"] = {axis: _checked_range(axis, value, path)
                          for axis, value in data["shapes"].items()
                          if f"shapes.{axis}" not in overridden}
    return data


def resolve_spec(spec_file=None, **flags) -> BuildSpec:
    """The spec file's values, overridden by the flags that are not None."""
    shapes = parse_shapes(flags.pop("shapes", None) or "")
    given = {key: value for key, value in flags.items() if value is not None}
    overridden = {*given, *(f"shapes.{axis}" for axis in shapes)}
    values = load_spec_file(spec_file, overridden) if spec_file else {}
    values.update(given)
    if shapes:  # each axis given on the command line replaces the spec's
        values["shapes"] = {**values.get("shapes", {}), **shapes}
    if not values.get("onnx"):
        raise UserError("nothing to build: pass --onnx OUT/model.onnx (a plugin-flavour export) "
                        "or --spec FILE")
    if not values.get("out"):
        raise UserError("pass --out engines/NAME (or out in the spec)")
    precision = values.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    workspace = values.get("workspace_mb")
    if workspace is not None and (not is_json_int(workspace) or workspace < 1):
        raise UserError(f"workspace must be a positive number of MB, got {workspace!r}")
    return BuildSpec(
        onnx=Path(values["onnx"]), out=Path(values["out"]),
        plugin=Path(values["plugin"]) if values.get("plugin") else _built_plugin(),
        precision=precision, shapes=values.get("shapes", {}),
        timing_cache=Path(values["timing_cache"]) if values.get("timing_cache") else None,
        workspace_mb=workspace, attention_outputs=bool(values.get("attention_outputs", False)))


def _built_plugin() -> Path:
    """The plugin ``make plugins`` builds (native imports torch: not for the command's help)."""
    from ..native import PLUGIN_LIBRARY, build_dir

    return build_dir() / PLUGIN_LIBRARY


def _checked_range(axis: str, value, where="--shapes") -> tuple[int, int, int]:
    if axis not in AXES:
        raise UserError(f"{where}: unknown axis {axis!r} (axes: {', '.join(AXES)})")
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(map(is_json_int, value))):
        raise UserError(f"{where}: {axis} must be [MIN, OPT, MAX] integers, got {value!r}")
    low, opt, high = value
    if not 1 <= low <= opt <= high:
        raise UserError(f"{where}: {axis} needs 1 <= MIN <= OPT <= MAX, got {low}/{opt}/{high}")
    return (low, opt, high)
