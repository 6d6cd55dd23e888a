"""``config.pbtxt`` against Triton's own schema: ``model_config.proto`` as tritonclient ships it.

A configuration is written from a dict through protobuf's JSON parser into Triton's
``ModelConfig`` message (a field Triton does not know, a value of the wrong type or two choices of
one ``oneof`` fail there), then printed in protobuf's text format; every file written is read back
with ``text_format.Parse`` as Triton reads it. Either failure is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, first_line

CONFIG_FILE = "config.pbtxt"
NEEDS_TRITONCLIENT = ("checking config.pbtxt against Triton's schema needs tritonclient's gRPC "
                      "package: pip install -e '.[serve]' in the mra-export checkout")


def model_config_message():
    """An empty ``inference.ModelConfig`` (Triton's ``model_config.proto``)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise UserError(NEEDS_TRITONCLIENT) from None
    return model_config_pb2.ModelConfig()


def config_text(config: dict, where: str | Path) -> str:
    """``config`` (field names as in model_config.proto) as Triton's text format, after protobuf
    has checked every field and value against the schema."""
    from google.protobuf import json_format, text_format

    try:
        message = json_format.ParseDict(config, model_config_message())
    except json_format.ParseError as error:
        raise UserError(f"{where} does not fit Triton's model_config.proto: "
                        f"{first_line(error)}") from None
    return text_format.MessageToString(message)


def check_config_text(text: str, where: str | Path):
    """The ``ModelConfig`` that ``text`` describes, parsed as Triton parses config.pbtxt; a
    misspelled field, a wrong type or an unknown enum value is one line naming ``where``."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, model_config_message())
    except text_format.ParseError as error:
        raise UserError(f"{where} does not fit Triton's model_config.proto: "
                        f"{first_line(error)}") from None


def check_config_file(path: str | Path):
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {first_line(error)}") from None
    return check_config_text(text, path)
