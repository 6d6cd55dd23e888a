#!/usr/bin/env python3
"""Triton under load: concurrent clients against an export served by Triton's python backend.

    python tools/triton_load.py [--onnx OUT] [--clients 8] [--requests 50]
                                [--out tools/results/triton-load.json]

Without ``--onnx`` it exports the built-in default checkpoint's text-classification head (the
demo's model: hidden 128, 2 layers, 512 positions) into a temporary folder. ``mra-export triton
--backend python`` writes it twice into a temporary repository: ``mra`` (max batch size 8,
dynamic batching) and ``mra_b1`` (max batch size 1), one CPU instance each. The server of
``make triton-server`` runs on 127.0.0.1 (free ports) and both models are warmed, then:

1. ``--clients`` gRPC clients each send ``--requests`` requests of mixed lengths (24, 64, 128) and
   batch sizes (1, 2, 4) to ``mra``: p50, p99, throughput, errors, and Triton's statistics for
   the run (requests, batch rows, model executions: fewer executions than requests is the
   dynamic batcher merging them);
2. the same clients send batch-1 requests to ``mra`` and to ``mra_b1``, in ``--rounds`` rounds
   of alternating order, once for each length alone and once for the lengths mixed: the
   throughput ratio (median over rounds) is what dynamic batching gains over a max batch size of
   1 on this machine. Triton merges only requests of the same shape, so mixed lengths gain little.

Writes the JSON to ``--out`` and a Markdown table beside it (command, machine, repository tree).
The run is bounded: clients x requests requests per phase, then the server is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mra_export.bench.cli import cpu_name  # noqa: E402
from mra_export.bench.cli import int_within  # noqa: E402
from mra_export.errors import UserError  # noqa: E402
from mra_export.files import check_writable_file  # noqa: E402
from mra_export.serving import load  # noqa: E402
from mra_export.serving.server import TritonServer  # noqa: E402
from mra_export.serving.triton import write_repository  # noqa: E402

DEFAULT_OUT = ROOT / "tools" / "results" / "triton-load.json"
BATCHED, SINGLE = "mra", "mra_b1"
WARMUP_REQUESTS = 12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", metavar="OUT", help="a portable export (default: the built-in "
                        "checkpoint's text-classification head, exported here)")
    parser.add_argument("--clients", type=int_within(1, 64), default=8)
    parser.add_argument("--requests", type=int_within(1, 1000), default=50,
                        help="requests per client and phase")
    parser.add_argument("--rounds", type=int_within(1, 20), default=5,
                        help="rounds of the batch-1 comparison (default: 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.out.suffix != ".json":  # results are replaced, and the table written beside them
        parser.error(f"--out names the results' .json file (the table goes beside it as .md), "
                     f"got {args.out}")
    try:
        check_writable_file(args.out)  # now, not after minutes of load
        result = run(args)
    except UserError as error:
        print(f"triton_load: error: {error}", file=sys.stderr)
        return 2
    write_results(result, args.out)
    print(markdown(result))
    return 0


def run(args) -> dict:
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="triton-load-") as work:
        work = Path(work)
        export = Path(args.onnx) if args.onnx else default_export(work / "export")
        repo = work / "repo"
        quiet = lambda message: None  # noqa: E731
        for name, batch in ((BATCHED, 8), (SINGLE, 1)):
            write_repository(repo, onnx=export, name=name, max_batch_size=batch,
                             backend="python", log=quiet)
        tree = repository_tree(repo)
        from mra_export.runtime.ort import OrtMraModel

        model = OrtMraModel.from_pretrained(export, "CPUExecutionProvider")
        info, vocab = model.info, model.config.vocab_size
        choices = info.task == "multiple-choice"
        with TritonServer(repo, log_path=work / "server.log") as server:
            url = server.grpc_url
            for name in (BATCHED, SINGLE):  # first runs build sessions and caches: not measured
                warmup = [load.mixed_feeds(info.inputs, vocab, WARMUP_REQUESTS, seed=99,
                                           batches=(1,), choices=choices)]
                load.run_load(url, name, warmup, info.outputs)
            mixed = [load.mixed_feeds(info.inputs, vocab, args.requests, seed=c, choices=choices)
                     for c in range(args.clients)]
            before = load.batching_stats(url, BATCHED)
            measured = load.run_load(url, BATCHED, mixed, info.outputs)
            counts = load.batching_stats_since(url, BATCHED, before,
                                                 measured.requests - len(measured.errors))
            scenarios = {lengths: compare_rounds(url, batch_one_feeds(info, vocab, lengths, args,
                                                                      choices),
                                                 info.outputs, args.rounds)
                         for lengths in [(length,) for length in load.LENGTHS] + [load.LENGTHS]}
            server_version = server_version_of(server)
    return {
        "command": " ".join(["python", "tools/triton_load.py", *sys.argv[1:]]),
        "tree": source_tree(),
        "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, load average "
                   f"{load_average:.1f} before the run",
        "server": f"tritonserver {server_version} (nvidia-pytriton wheel), python backend, "
                  "one CPU instance per model",
        "model": {"export": str(export) if args.onnx else "built-in default checkpoint "
                  f"({info.task}), exported here", "task": info.task, "dtype": info.dtype,
                  "max_sequence_length": info.max_sequence_length},
        "load": {"model": BATCHED, "clients": args.clients, "requests_per_client": args.requests,
                 "lengths": list(load.LENGTHS), "batch_sizes": list(load.BATCHES),
                 "protocol": "grpc", **measured.summary(),
                 "triton_requests": counts.requests, "triton_inference_count": counts.inferences,
                 "triton_execution_count": counts.executions,
                 "first_errors": measured.errors[:5]},
        "batching_vs_batch_size_1": [scenario_summary(lengths, rounds)
                                     for lengths, rounds in scenarios.items()],
        "repository_tree": tree,
    }


def batch_one_feeds(info, vocab: int, lengths, args, choices: bool) -> list:
    return [load.mixed_feeds(info.inputs, vocab, args.requests, seed=100 + client,
                             lengths=lengths, batches=(1,), choices=choices)
            for client in range(args.clients)]


def compare_rounds(url: str, feeds, outputs, count: int) -> list[dict]:
    """The same batch-1 load on both models, ``count`` rounds, the order swapped each round (so
    that other work on the machine weighs on both alike); each round's pair run back to back.
    Each run: its LoadResult and the model's executions (Triton's statistics)."""
    rounds = []
    for index in range(count):
        order = (BATCHED, SINGLE) if index % 2 == 0 else (SINGLE, BATCHED)
        rounds.append({name: measured_run(url, name, feeds, outputs) for name in order})
    return rounds


def measured_run(url: str, name: str, feeds, outputs) -> tuple:
    before = load.batching_stats(url, name)
    result = load.run_load(url, name, feeds, outputs)
    counts = load.batching_stats_since(url, name, before, result.requests - len(result.errors))
    return result, counts.executions


def scenario_summary(lengths, rounds: list[dict]) -> dict:
    ratios = [ratio(r) for r in rounds]
    return {"lengths": list(lengths), "requests_per_round": rounds[0][BATCHED][0].requests,
            "batch_size": 1, "rounds": len(rounds),
            BATCHED: median_summary([r[BATCHED] for r in rounds]),
            SINGLE: median_summary([r[SINGLE] for r in rounds]),
            "throughput_ratio_per_round": [round(value, 2) for value in ratios],
            "throughput_ratio_median": round(float(np.median(ratios)), 2)}


def ratio(round_: dict) -> float:
    return round_[BATCHED][0].throughput / round_[SINGLE][0].throughput


def median_summary(runs) -> dict:
    """The run whose throughput is the median (its own latencies and executions with it)."""
    ranked = sorted(runs, key=lambda run: run[0].throughput)
    result, executions = ranked[len(ranked) // 2]
    return {**result.summary(), "executions": executions,
            "errors_all_rounds": sum(len(run[0].errors) for run in runs)}


def source_tree() -> str:
    """The commit measured, marked ``-dirty`` where the checkout has uncommitted changes."""
    import subprocess

    found = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "unknown (not a git checkout)"


def default_export(folder: Path) -> Path:
    from mra_export.checkpoints import build_checkpoint
    from mra_export.export import export_model
    from mra_export.tasks import TASKS

    checkpoint = build_checkpoint(folder.parent / "checkpoint", TASKS["text-classification"])
    export_model(checkpoint, folder, task="text-classification", log=lambda message: None)
    return folder


def repository_tree(repo: Path) -> list[str]:
    """The repository's files, as paths below it (sizes in bytes)."""
    return [f"{path.relative_to(repo)} ({path.stat().st_size} B)"
            for path in sorted(repo.rglob("*")) if path.is_file()]


def server_version_of(server: TritonServer) -> str:
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    try:
        return client.get_server_metadata()["version"]
    finally:
        client.close()


def write_results(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")


def markdown(result: dict) -> str:
    load_ = result["load"]
    return "\n".join([
        f"Command: `{result['command']}` (tree {result['tree']})  ",
        f"Machine: {result['machine']}  ",
        f"Server: {result['server']}  ",
        f"Model: {result['model']['export']}; {result['model']['dtype']}, up to "
        f"{result['model']['max_sequence_length']} tokens",
        "",
        f"{load_['clients']} concurrent gRPC clients on 127.0.0.1, each sending its requests one "
        f"after another; lengths {load_['lengths']}, batch sizes {load_['batch_sizes']}.",
        "",
        "| mixed load | requests | errors | p50 ms | p99 ms | requests/s | rows/s |",
        "|---|---|---|---|---|---|---|",
        f"| `{load_['model']}` (max batch 8) | {load_['requests']} | {load_['errors']} | "
        f"{load_['p50_ms']} | {load_['p99_ms']} | {load_['throughput_requests_per_s']} | "
        f"{load_['throughput_samples_per_s']} |",
        "",
        f"Triton's statistics for the mixed load: {load_['triton_requests']} requests, "
        f"{load_['triton_inference_count']} batch rows, {load_['triton_execution_count']} model "
        f"executions ({merged(load_)}).",
        "",
        "**Dynamic batching against a max batch size of 1**: the same clients send batch-1 "
        "requests to `mra` (max batch 8, dynamic batching) and to `mra_b1` (max batch 1), rounds "
        "back to back in alternating order; requests/s, p50 and executions are the median "
        "round's. Triton merges only requests of the same shape, so with mixed lengths fewer "
        "requests meet one of their own length in the queue.",
        "",
        "| requests of length | `mra` requests/s | `mra` p50 ms | `mra` executions | "
        "`mra_b1` requests/s | `mra_b1` p50 ms | errors | throughput ratio (median) | per round |",
        "|---|---|---|---|---|---|---|---|---|",
        *(scenario_row(scenario) for scenario in result["batching_vs_batch_size_1"]),
        "",
        "Repository (`mra-export triton --backend python`, written to a temporary folder):",
        "",
        "```",
        *result["repository_tree"],
        "```",
    ])


def scenario_row(scenario: dict) -> str:
    batched, single = scenario[BATCHED], scenario[SINGLE]
    lengths = ", ".join(map(str, scenario["lengths"]))
    lengths = lengths if len(scenario["lengths"]) == 1 else f"{lengths} (mixed)"
    return (f"| {lengths} | {batched['throughput_requests_per_s']} | {batched['p50_ms']} | "
            f"{batched['executions']} of {batched['requests']} | "
            f"{single['throughput_requests_per_s']} | {single['p50_ms']} | "
            f"{batched['errors_all_rounds'] + single['errors_all_rounds']} | "
            f"{scenario['throughput_ratio_median']}x | {scenario['throughput_ratio_per_round']} |")


def merged(load_: dict) -> str:
    if load_["triton_execution_count"] < load_["triton_requests"]:
        return "fewer executions than requests: the dynamic batcher merged requests"
    return "no fewer executions than requests: no request was merged"


if __name__ == "__main__":
    sys.exit(main())
