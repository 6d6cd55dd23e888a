#!/usr/bin/env python3
"""How far onnxruntime could outrun the patched PyTorch model on this CPU: the bench's layer
exported with a free attention.

    python tools/speed_ceiling.py [--length 4096] [--batch 1]

Times, in one process and as ``mra-export bench`` does (median of repeated runs after a
warm-up), the bench's MRA layer in PyTorch and in onnxruntime, and then the same layer exported
with a free attention: it returns query + key + value, the least an attention can do (read its
three inputs once, write an output-sized tensor; zeros would let the exporter drop the
projections). What is left in that last graph (the projections, the feed-forward layer, layer
norms) every MRA export must compute, so no attention graph can make onnxruntime faster than it:
PyTorch's time over it is the highest "onnxruntime over PyTorch" ratio this CPU allows, the
ceiling for issue 6's 2x target.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mra_export import patching  # noqa: E402
from mra_export.bench import models  # noqa: E402
from mra_export.bench.cli import cpu_name, int_within  # noqa: E402
from mra_export.bench.measure import measure  # noqa: E402
from mra_export.bench.report import SPEEDUP_OVER_PYTORCH  # noqa: E402
from mra_export.runtime.ort import CPU  # noqa: E402

def free_attention(query, key, value, attention_mask, **settings):
    return query + key + value


def export_with_free_attention(mra, path: Path) -> Path:
    with mock.patch.object(patching, "mra_attention", free_attention):
        return models.export(mra, path)


def exports(mra, folder: Path) -> dict[str, Path]:
    return {"mra onnxruntime": models.export(mra, folder / "mra.onnx"),
            "mra onnxruntime, free attention": export_with_free_attention(mra, folder / "free.onnx")}


def times(length: int, batch: int, log=print) -> dict[str, float]:
    """Median milliseconds per forward pass of each way of running the layer."""
    mra, _ = models.build_models(layers=1)
    with tempfile.TemporaryDirectory(prefix="speed-ceiling-") as folder:
        backends = [models.torch_backend("mra pytorch", "mra", mra, "cpu")]
        backends += [models.ort_backend(name, "mra", path, CPU)
                     for name, path in exports(mra, Path(folder)).items()]
        found = {}
        for backend in backends:
            log(f"timing {backend.name} ...")
            found[backend.name] = 1e3 * measure(backend.prepare(batch, length))["median_s"]
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int_within(1, models.MAX_LENGTH), default=models.MAX_LENGTH)
    parser.add_argument("--batch", type=int_within(1), default=1)
    args = parser.parse_args(argv)

    found = times(args.length, args.batch)
    print(f"\none MRA layer, batch {args.batch}, {args.length} tokens, on {cpu_name()}; "
          "median ms per run")
    for name, ms in found.items():
        print(f"  {name:<34} {ms:9.2f}")
    pytorch = found["mra pytorch"]
    measured = pytorch / found["mra onnxruntime"]
    ceiling = pytorch / found["mra onnxruntime, free attention"]
    print(f"onnxruntime over PyTorch: {measured:.2f}x measured; at most {ceiling:.2f}x with any "
          f"attention graph on this CPU (target >= {SPEEDUP_OVER_PYTORCH:g}x: "
          f"{'within reach' if ceiling >= SPEEDUP_OVER_PYTORCH else 'out of reach'})")


if __name__ == "__main__":
    main()
