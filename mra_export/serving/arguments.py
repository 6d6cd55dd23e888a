"""Arguments of ``mra-export triton``, and the choices they offer: without torch, so that the
command line's help is quick."""

from __future__ import annotations

DEFAULT_MAX_BATCH_SIZE = 8
EXPORT_BACKENDS = ("onnxruntime", "python")
DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}  # --device: Triton's instance kind


def add_triton_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", metavar="OUT", help="an export folder (mra-export export)")
    source.add_argument("--engine", metavar="DIR", help="an engine folder (mra-export build)")
    parser.add_argument("--repo", required=True, help="the model repository (made if missing; "
                        "other models in it are left alone)")
    parser.add_argument("--name", help="the model's name (default: the folder's name)")
    parser.add_argument("--max-batch-size", type=int, metavar="N",
                        help=f"Triton's max_batch_size; dynamic batching above 1 (default: "
                        f"{DEFAULT_MAX_BATCH_SIZE} for exports, the profile's for engines)")
    parser.add_argument("--instances", type=int, default=1, metavar="N",
                        help="model instances (default: 1)")
    parser.add_argument("--device", choices=tuple(DEVICES),
                        help="instance kind (default: cpu for exports, gpu for engines)")
    parser.add_argument("--backend", choices=(*EXPORT_BACKENDS, "tensorrt"),
                        help="default: onnxruntime for exports, tensorrt for engines; python "
                        "serves an export through OrtMraModel (runs with the server that "
                        "'make triton-server' fetches)")
