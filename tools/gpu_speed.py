#!/usr/bin/env python3
"""GPU speed of the fused op, alone and in the whole model, against SDPA and RoBERTa (issues 24, 25).

    MRA_EXPORT_PLUGIN_BUILD=plugins/build-h200 python tools/gpu_speed.py [--out DIR] [--quick]

1. The attention op (12 heads, head_dim 64, 8 blocks per row, all tokens real) against dense
   ``scaled_dot_product_attention`` of the same inputs, fp16 and fp32, batch 1 and 8, 1024-4096
   tokens, timed two ways: **device** time, CUDA events around a captured CUDA graph of
   ``REPLAYS`` calls (launch overhead gone, as inside an engine), and **python** time, events
   around one call from Python (what an eager PyTorch user pays). Medians.
2. The whole model: mra-base shapes (12 layers, hidden 768, 12 heads, intermediate 3072, 4096
   positions) patched with ``attention="fused"`` and ``"reference"``, against RoBERTa-base with
   SDPA, fp16, 4096 tokens, batch 1 and 8; random weights, medians of events around a forward.
   The fused op runs twice: as it lays out Q, K and V itself (token-major views, no copy) and
   forced head-major (the four copies per layer it made before 2026-12-04), so the two columns
   show what the layout moved. Then each model's heaviest CUDA kernels per forward
   (torch.profiler), which say where the whole model's time goes against RoBERTa's. On sm_90
   the op's kernels after the first are programmatic dependent launches, whose profiled time
   includes their wait for the kernel before: their sums overlap (Nsight Compute's table,
   tools/kernel_profile.py, gives each kernel's own).

``--op-only`` times the op alone (1.), as an A/B of two kernel builds needs: run it once per
build, each named by ``MRA_EXPORT_PLUGIN_BUILD`` (``tools/gpu_session.sh`` does so for each build
it carries in ``.carry-libs/ab/``).

Writes ``gpu_speed.json`` and ``gpu_speed.md`` into --out and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_check import median_ms  # noqa: E402  (tools/ is this script's folder)
from mra_export import fused  # noqa: E402
from mra_export.fused import mra_attention_op  # noqa: E402
from mra_export.patching import patch_model  # noqa: E402

HEADS, HEAD_DIM, BLOCKS_PER_ROW = 12, 64, 8
REPLAYS = 20
# The whole model's variants: (column, patch_model's attention, the op's forced memory layout).
MRA_VARIANTS = (("fused", "fused", None), ("fused_head_major", "fused", "bhsd"),
                ("reference", "reference", None))
TOP_KERNELS = 8
BASE = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12,
            vocab_size=50265, type_vocab_size=1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def graph_ms(run) -> float:
    """Device time of one ``run``: a CUDA graph of REPLAYS calls, replayed, divided."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS):
            run()
    return median_ms(graph.replay, repeats=10) / REPLAYS


def attention_rows(quick: bool) -> list[dict]:
    rows = []
    lengths = (2048, 4096) if quick else (1024, 2048, 4096)
    for dtype in (torch.float16, torch.float32):
        for batch in (1, 8):
            for length in lengths:
                q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype)
                           for _ in range(3))
                mask = torch.ones(batch, length, device="cuda", dtype=torch.int32)
                blocks = BLOCKS_PER_ROW * (length // 32)

                def mra():
                    return mra_attention_op(q, k, v, mask, blocks, "full", 32, 0, 0)

                def sdpa():
                    return F.scaled_dot_product_attention(q, k, v)

                row = dict(dtype=str(dtype).removeprefix("torch."), batch=batch, length=length,
                           mra_device_ms=graph_ms(mra), sdpa_device_ms=graph_ms(sdpa),
                           mra_python_ms=median_ms(mra), sdpa_python_ms=median_ms(sdpa))
                row["sdpa_over_mra_device"] = row["sdpa_device_ms"] / row["mra_device_ms"]
                rows.append(row)
                print(_attention_line(row), flush=True)
    return rows


def _attention_line(row) -> str:
    return (f"| {row['dtype']} | {row['batch']} | {row['length']} | {row['mra_device_ms']:.3f} | "
            f"{row['sdpa_device_ms']:.3f} | {row['sdpa_over_mra_device']:.2f}x | "
            f"{row['mra_python_ms']:.3f} | {row['sdpa_python_ms']:.3f} |")


def models(dtype):
    from transformers import MraConfig, MraModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    mra = MraModel(MraConfig(**BASE, max_position_embeddings=4096, block_per_row=BLOCKS_PER_ROW))
    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(**BASE, max_position_embeddings=4098))
    return mra.eval().to("cuda", dtype), roberta.eval().to("cuda", dtype)


@contextlib.contextmanager
def forced_layout(layout: str | None):
    """The fused op's memory layout forced to ``layout`` (None: the op's own choice)."""
    if layout is None:
        yield
        return
    with mock.patch.object(fused, "memory_layout", lambda *tensors: layout):
        yield


def heaviest_kernels(forward, runs: int = 3) -> dict:
    """The CUDA kernels of one ``forward``: their total ms and the TOP_KERNELS heaviest, from
    torch.profiler over ``runs`` calls."""
    from torch.profiler import ProfilerActivity, profile

    forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        for _ in range(runs):
            forward()
        torch.cuda.synchronize()
    kernels = [(event.key, event.self_device_time_total / 1e3 / runs)
               for event in profiled.key_averages()
               if event.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda kernel: -kernel[1])
    return dict(total_ms=sum(ms for _, ms in kernels), top=kernels[:TOP_KERNELS])


def model_rows(quick: bool) -> tuple[list[dict], list[dict]]:
    """The whole-model times, and each model's heaviest kernels."""
    rows, kernels = [], []
    mra, roberta = models(torch.float16)
    print(f"RoBERTa's attention: {roberta.config._attn_implementation}", flush=True)
    length, repeats = 4096, 5 if quick else 10
    for batch in (1, 8):
        ids = torch.randint(5, 1000, (batch, length), device="cuda")
        mask = torch.ones(batch, length, device="cuda", dtype=torch.long)
        row = dict(dtype="float16", batch=batch, length=length)
        forward_mra = lambda: mra(input_ids=ids, attention_mask=mask)  # noqa: E731
        forward_roberta = lambda: roberta(input_ids=ids, attention_mask=mask)  # noqa: E731
        with torch.inference_mode():
            for name, attention, layout in MRA_VARIANTS:
                patch_model(mra, attention=attention)
                with forced_layout(layout):
                    row[f"mra_{name}_ms"] = median_ms(forward_mra, repeats=repeats)
                    if name != "reference":
                        kernels.append(dict(model=f"mra_{name}", batch=batch,
                                            **heaviest_kernels(forward_mra)))
            row["roberta_sdpa_ms"] = median_ms(forward_roberta, repeats=repeats)
            kernels.append(dict(model="roberta_sdpa", batch=batch,
                                **heaviest_kernels(forward_roberta)))
        row["fused_over_roberta"] = row["mra_fused_ms"] / row["roberta_sdpa_ms"]
        row["head_major_over_fused"] = row["mra_fused_head_major_ms"] / row["mra_fused_ms"]
        row["reference_over_roberta"] = row["mra_reference_ms"] / row["roberta_sdpa_ms"]
        rows.append(row)
        print(_model_line(row), flush=True)
    return rows, kernels


def _model_line(row) -> str:
    return (f"| {row['batch']} | {row['mra_fused_ms']:.2f} | {row['mra_fused_head_major_ms']:.2f} | "
            f"{row['mra_reference_ms']:.2f} | {row['roberta_sdpa_ms']:.2f} | "
            f"{row['fused_over_roberta']:.2f}x | {row['head_major_over_fused']:.2f}x |")


MODEL_HEADER = ("| batch | MRA fused | MRA fused, head-major | MRA reference | RoBERTa SDPA | "
                "fused / RoBERTa | head-major / fused |\n|---|---|---|---|---|---|---|")


def _kernel_lines(entry) -> list[str]:
    lines = [f"- {entry['model']}, batch {entry['batch']}: {entry['total_ms']:.2f} ms of kernels "
             "per forward"]
    lines += [f"  - {ms:.3f} ms `{name[:110]}`" for name, ms in entry["top"]]
    return lines


def markdown(result: dict) -> str:
    lines = [f"# GPU speed ({result['device']}, torch {result['torch']})", "",
             f"`{result['command']}`", "", f"Kernel library: `{result['library']}`", "",
             "## The attention op (ms)", "",
             "| dtype | batch | tokens | MRA device | SDPA device | SDPA / MRA | MRA python | SDPA python |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_attention_line(row) for row in result["attention"]]
    if not result["models"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Whole model, 12 layers, fp16, 4096 tokens (ms, from Python)", "", MODEL_HEADER]
    lines += [_model_line(row) for row in result["models"]]
    lines += ["", "## The heaviest kernels per forward (torch.profiler)", "",
              "On sm_90 the op's dependent kernels are timed from their start, waits included, "
              "so their times overlap.", ""]
    for entry in result["kernels"]:
        lines += _kernel_lines(entry)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    parser.add_argument("--op-only", action="store_true",
                        help="the attention op alone, not the whole model")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "gpu_speed: no CUDA GPU here\n")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("| dtype | batch | tokens | MRA device | SDPA device | SDPA / MRA | MRA python | SDPA python |")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  command="python tools/gpu_speed.py " + " ".join(argv or sys.argv[1:]),
                  attention=attention_rows(args.quick))
    result["library"] = str(fused.kernel_library("cuda").path)
    result["models"], result["kernels"] = [], []
    if not args.op_only:
        print(MODEL_HEADER)
        result["models"], result["kernels"] = model_rows(args.quick)
    result["seconds"] = time.time() - started
    (args.out / "gpu_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_speed.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
