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

Writes ``gpu_speed.json`` and ``gpu_speed.md`` into --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_check import median_ms  # noqa: E402  (tools/ is this script's folder)
from mra_export.fused import mra_attention_op  # noqa: E402
from mra_export.patching import patch_model  # noqa: E402

HEADS, HEAD_DIM, BLOCKS_PER_ROW = 12, 64, 8
REPLAYS = 20
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


def model_rows(quick: bool) -> list[dict]:
    rows = []
    mra, roberta = models(torch.float16)
    print(f"RoBERTa's attention: {roberta.config._attn_implementation}", flush=True)
    length = 4096
    for batch in (1, 8):
        ids = torch.randint(5, 1000, (batch, length), device="cuda")
        mask = torch.ones(batch, length, device="cuda", dtype=torch.long)
        row = dict(dtype="float16", batch=batch, length=length)
        with torch.inference_mode():
            for attention in ("fused", "reference"):
                patch_model(mra, attention=attention)
                row[f"mra_{attention}_ms"] = median_ms(
                    lambda: mra(input_ids=ids, attention_mask=mask), repeats=5 if quick else 10)
            row["roberta_sdpa_ms"] = median_ms(lambda: roberta(input_ids=ids, attention_mask=mask),
                                               repeats=5 if quick else 10)
        row["fused_over_roberta"] = row["mra_fused_ms"] / row["roberta_sdpa_ms"]
        row["reference_over_roberta"] = row["mra_reference_ms"] / row["roberta_sdpa_ms"]
        rows.append(row)
        print(f"| {batch} | {row['mra_fused_ms']:.2f} | {row['mra_reference_ms']:.2f} | "
              f"{row['roberta_sdpa_ms']:.2f} | {row['fused_over_roberta']:.2f}x |", flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"# GPU speed ({result['device']}, torch {result['torch']})", "",
             f"`{result['command']}`", "", "## The attention op (ms)", "",
             "| dtype | batch | tokens | MRA device | SDPA device | SDPA / MRA | MRA python | SDPA python |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_attention_line(row) for row in result["attention"]]
    lines += ["", "## Whole model, 12 layers, fp16, 4096 tokens (ms, from Python)", "",
              "| batch | MRA fused | MRA reference | RoBERTa SDPA | fused / RoBERTa |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['mra_fused_ms']:.2f} | {r['mra_reference_ms']:.2f} | "
              f"{r['roberta_sdpa_ms']:.2f} | {r['fused_over_roberta']:.2f}x |" for r in result["models"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "gpu_speed: no CUDA GPU here\n")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("| dtype | batch | tokens | MRA device | SDPA device | SDPA / MRA | MRA python | SDPA python |")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  command="python tools/gpu_speed.py " + " ".join(argv or sys.argv[1:]),
                  attention=attention_rows(args.quick))
    print("| batch | MRA fused | MRA reference | RoBERTa SDPA | fused / RoBERTa |")
    result["models"] = model_rows(args.quick)
    result["seconds"] = time.time() - started
    (args.out / "gpu_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_speed.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
