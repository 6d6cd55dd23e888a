#!/usr/bin/env python3
"""onnxruntime's CUDA provider: MRA's portable graph against the plugin graph whose MraAttention
nodes run in libmra_attention_ort.so's CUDA kernel, and RoBERTa's (dense) graph (issue 24).

    python tools/ort_cuda_speed.py export DIR [--dtypes fp16,fp32] [--graphs mra-portable,mra-op,dense]
    python tools/ort_cuda_speed.py run DIR [--out OUT]   # on a GPU with onnxruntime-gpu
    python tools/ort_cuda_speed.py scans DIR   # here: bytes moved, and what CumSum costs there

One encoder layer of mra-base shapes (hidden 768, 12 heads, intermediate 3072, 8 blocks per row at
4096 positions; a 1000-token vocabulary so that the graphs travel light: the embedding lookup's
cost does not depend on it), exported as the bench exports it. ``run`` times each graph at 4096
tokens, batch 1 and 8, three ways (medians): with its inputs and outputs on the GPU (onnxruntime's
I/O binding: the graph's own time, as the bench's CUDA columns take it); the same captured as one
CUDA graph and replayed (what launching each node from the host costs, hundreds of nodes a layer in
the portable graph); and by session.run from the host (the inputs copied to the GPU, the outputs
back: the same copies for every graph, and at batch 8 the one-layer model's output alone is 50 MB
in fp16). It checks the op graph against the portable one, and counts the Memcpy nodes the CUDA
provider inserted (nodes it placed on the CPU), from its optimized graph. It also lists the tensors
those nodes copy, with the nodes on either side, and the nodes a profiled run shows on the CPU
provider (shape arithmetic whose results only feed inputs that the CUDA kernels take on the host
belongs there, and costs no copy). ``run`` times the graphs it finds in DIR (a graph of one layer
is about 21 MB in fp16: the position embeddings of 4096 positions weigh half of it, which matters
for what a device call may carry). ``scans`` runs each graph once on the CPU provider, at batch 1
and 8: its nodes and the bytes they move (``bytes_moved``), and its CumSum nodes with the reads the
CUDA provider's CumSum kernel makes for them (``cumsum_scans``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LENGTH, BATCHES = 4096, (1, 8)
GRAPHS = ("mra-portable", "mra-op", "dense")
BOUND = "_iobinding"  # the keys of I/O-bound timings: inputs and outputs on the GPU
CAPTURED = "_cudagraph"  # and of those replayed as one captured CUDA graph
TIMINGS = ("", BOUND, CAPTURED)  # "": session.run from the host
RATIOS = {"portable_over_op": ("mra-portable", "mra-op"), "op_over_dense": ("mra-op", "dense"),
          "portable_over_dense": ("mra-portable", "dense")}  # key: (numerator, denominator)


def export(folder: Path, dtypes: list[str], names: list[str]) -> None:
    import onnx_ir as ir
    import torch

    from mra_export.bench import models
    from mra_export.export.exporter import _trace
    from mra_export.tasks import TASKS

    models.SHAPES["vocab_size"] = 1000
    mra, dense = models.build_models(layers=1)
    folder.mkdir(parents=True, exist_ok=True)
    graphs = [("mra-portable", mra, "portable"), ("mra-op", mra, "plugin"),
              ("dense", dense, "portable")]
    graphs = [graph for graph in graphs if graph[0] in names]
    for dtype in dtypes:
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        for name, model, flavour in graphs:
            path = folder / f"{name}-{dtype}.onnx"
            ir.save(_trace(model.to(torch_dtype), TASKS["feature-extraction"], flavour, 20), path)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)", flush=True)


def session(path: Path, optimized: Path | None = None, profile_prefix: Path | None = None,
            cuda_graph: bool = False):
    """A CUDA-provider session; it saves its optimized graph to ``optimized`` and, given
    ``profile_prefix``, profiles its runs; ``cuda_graph``: it captures its runs as a CUDA graph
    and replays it (the provider's ``enable_cuda_graph``)."""
    import onnxruntime as ort

    from mra_export.runtime.ort import CUDA, CUDA_FP32, default_options, register_op_library

    provider = (CUDA, {**CUDA_FP32[1], "enable_cuda_graph": "1"}) if cuda_graph else CUDA_FP32
    options = default_options()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if path.name.startswith("mra-op"):
        register_op_library(options)
    return ort.InferenceSession(str(path), options, providers=[provider])


def host_copies(optimized: Path) -> list[dict]:
    """The Memcpy nodes of an optimized graph (saved through ``optimized_model_filepath``): the
    tensor each copies, the node that makes it (``None``: a graph input) and the nodes that read
    the copy. MemcpyFromHost: made on the CPU, read on the GPU; MemcpyToHost: the reverse."""
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    copies = []
    for node in graph.node:
        if not node.op_type.startswith("Memcpy"):
            continue
        tensor = node.input[0]
        made_by = producer.get(tensor)
        copies.append(dict(
            copy=node.op_type, tensor=tensor,
            made_by=f"{made_by.op_type} {made_by.name}" if made_by is not None else None,
            read_by=[f"{n.op_type} {n.name}" for n in graph.node if node.output[0] in n.input]))
    return copies


def describe_copy(copy: dict) -> str:
    return (f"{copy['copy']} {copy['tensor']}: made by {copy['made_by'] or 'the graph input'}, "
            f"read by {', '.join(copy['read_by']) or 'nothing'}")


def node_runs(profile: Path) -> list[dict]:
    """Each node run an onnxruntime profile records, in order: its name, op type, provider, and
    inputs and outputs as ``(type, shape)``."""
    def tensors(listed):
        return [next(iter(entry.items())) for entry in listed]

    return [dict(name=event["name"].removesuffix("_kernel_time"), op=event["args"].get("op_name"),
                 provider=event["args"].get("provider"),
                 inputs=tensors(event["args"].get("input_type_shape", [])),
                 outputs=tensors(event["args"].get("output_type_shape", [])))
            for event in json.loads(profile.read_text())
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")]


def cpu_provider_nodes(profile: Path) -> list[str]:
    """``"OpType node_name"`` of each node a CUDA session's profile shows on the CPU provider."""
    nodes = {run["name"]: run["op"] for run in node_runs(profile)
             if run["provider"] == "CPUExecutionProvider"}
    return [f"{op} {name}" for name, op in nodes.items()]


def placement(path: Path, folder: Path, feed: dict) -> dict:
    """Where the CUDA provider puts ``path``'s nodes: the copies it inserted (from the optimized
    graph) and the nodes one profiled run shows on the CPU provider; beside them, the copies
    tools/ort_cuda_placement.py predicts for the graph without a GPU, to check that prediction."""
    optimized = folder / f"{path.stem}-optimized.onnx"
    profiled = session(path, optimized, profile_prefix=folder / path.stem)
    profiled.run(None, feed)
    cpu_nodes = cpu_provider_nodes(Path(profiled.end_profiling()))
    return dict(copies=host_copies(optimized), cpu_nodes=cpu_nodes, predicted=predicted_copies(path))


def predicted_copies(path: Path) -> list[str] | str:
    """The copies tools/ort_cuda_placement.py predicts, described; or why it cannot say."""
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, this script's folder
    from ort_cuda_placement import predict

    try:
        return [describe_copy(copy)
                for copy in predict(onnx.load(str(path), load_external_data=False)).copies]
    except ValueError as error:  # an operator outside its tables
        return f"not predicted: {error}"


def placement_lines(name: str, where: dict) -> list[str]:
    """Markdown list items: a graph's copies, its nodes on the CPU provider, the prediction."""
    lines = [f"- {name}: {len(where['copies'])} Memcpy nodes, {len(where['cpu_nodes'])} nodes on "
             "the CPU provider"]
    lines += [f"  - {describe_copy(copy)}" for copy in where["copies"]]
    if where["cpu_nodes"]:
        lines.append(f"  - on the CPU: {', '.join(where['cpu_nodes'])}")
    predicted = where.get("predicted")
    if isinstance(predicted, str):
        lines.append(f"  - {predicted}")
    elif predicted is not None:
        lines.append(f"  - predicted here (tools/ort_cuda_placement.py): {len(predicted)} copies"
                     + "".join(f"; {copy}" for copy in predicted))
    return lines


def profiled_nodes(path: Path, feed: dict, profile_prefix: Path, optimized: bool) -> list[dict]:
    """One run of ``path`` on the CPU provider under onnxruntime's profiler (``node_runs``).
    ``optimized``:
    the nodes of onnxruntime's fully optimized graph (those that run), else of the file itself
    (no optimisation, so they keep its names)."""
    import onnxruntime as ort

    from mra_export.runtime.ort import CPU, default_options

    options = default_options()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_prefix)
    session = ort.InferenceSession(str(path), options, providers=[CPU])
    session.run(None, feed)
    return node_runs(Path(session.end_profiling()))


def cumsum_scans(path: Path, feed: dict, profile_prefix: Path) -> dict[str, dict]:
    """Each CumSum node of ``path`` in one profiled run on the CPU provider: its input shape,
    the length of its axis, and the reads onnxruntime's CUDA CumSum makes for it. That kernel
    has every output element add up its whole prefix (``cumsum_impl.cu``), so an axis of n
    costs n (n + 1) / 2 reads per lane: a count of work, not a time."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                      for n in graph.node if n.op_type == "Constant"})
    axis_of = {n.name: int(constants[n.input[1]]) for n in graph.node if n.op_type == "CumSum"}
    scans = {}
    for node in profiled_nodes(path, feed, profile_prefix, optimized=False):
        if node["name"] in axis_of:
            shape = node["inputs"][0][1]
            n = shape[axis_of[node["name"]]]
            lanes = int(np.prod(shape)) // n if n else 0
            scans[node["name"]] = dict(shape=shape, axis=n, reads=lanes * n * (n + 1) // 2)
    return scans


VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Identity"}  # move no data
GATHERS = {"Gather", "GatherElements", "GatherND"}
ELEMENT_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "double": 8, "int64": 8, "int32": 4,
                 "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def bytes_moved(nodes: list[dict]) -> dict:
    """What a graph's nodes read and write, counted from their shapes: a view nothing, a gather
    its indices and twice its output (the rows it reads, then writes), any other node its inputs
    and outputs. A lower bound on a GPU's memory traffic, and ``moving``: the nodes that move
    over 100 kB, each at least a kernel launch on a GPU."""
    def size(tensors):
        return sum(ELEMENT_BYTES.get(kind, 4) * int(np.prod(shape)) for kind, shape in tensors)

    moved = [size(node["inputs"][1:]) + 2 * size(node["outputs"]) if node["op"] in GATHERS
             else size(node["inputs"]) + size(node["outputs"])
             for node in nodes if node["op"] not in VIEWS]
    return dict(nodes=len(nodes), moving=sum(b > 100_000 for b in moved), bytes=sum(moved))


def print_scans(folder: Path) -> None:
    import tempfile

    scratch = Path(tempfile.mkdtemp())
    # Dense at batch 1 only: its attention scores at batch 8 need ~12 GB in fp32; every node of
    # its graph moves bytes in proportion to the batch.
    graphs = [(path, BATCHES) for path in sorted(folder.glob("mra-portable-*.onnx"))]
    graphs += [(path, BATCHES[:1]) for path in sorted(folder.glob("dense-*.onnx"))]
    for path, batches in graphs:
        for batch in batches:
            prefix = scratch / f"{path.stem}-{batch}"
            moved = bytes_moved(profiled_nodes(path, feed_of(batch), prefix, optimized=True))
            print(f"{path.name}, batch {batch}, {LENGTH} tokens: {moved['nodes']} nodes run, "
                  f"{moved['moving']} of them move over 100 kB, {moved['bytes'] / 1e9:.2f} GB "
                  "moved", flush=True)
            scans = cumsum_scans(path, feed_of(batch), prefix)
            total = sum(scan["reads"] for scan in scans.values())
            print(f"  {len(scans)} CumSum nodes, {total:.3g} reads on the CUDA provider",
                  flush=True)
            for name, scan in scans.items():
                print(f"  {name}: input {scan['shape']}, axis of {scan['axis']}, "
                      f"{scan['reads']:.3g} reads", flush=True)


def median_ms(run, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def replayed_ms(make_session, feed: dict, output_types: list, device: str = "cuda"):
    """Median ms of a session from ``make_session()`` run on ``feed`` through an I/O binding
    whose outputs, of ``output_types`` (shape, numpy dtype), lie at fixed addresses on
    ``device``, as onnxruntime's CUDA graphs need: captured once, each run then replays the whole
    graph without a launch from the host per node. Or, where onnxruntime refuses to capture it (a
    Memcpy node, a kernel that synchronizes), the line saying why."""
    import onnxruntime as ort

    from mra_export.errors import first_line
    from mra_export.runtime.ort import device_binding

    try:
        session = make_session()
        binding = device_binding(session, feed, device)
        binding.clear_binding_outputs()
        for output, (shape, dtype) in zip(session.get_outputs(), output_types):
            binding.bind_ortvalue_output(output.name, ort.OrtValue.ortvalue_from_shape_and_type(
                shape, dtype, device, 0))
        return median_ms(lambda: session.run_with_iobinding(binding))  # warm-up runs capture it
    except Exception as error:  # onnxruntime raises its own exception types
        return f"not captured: {first_line(error)}"


def run(folder: Path) -> dict:
    import tempfile

    import onnxruntime as ort

    from mra_export.runtime.ort import device_binding

    ort.preload_dlls()
    rows, placements, captures = [], {}, []
    scratch = Path(tempfile.mkdtemp())
    for dtype in ("fp16", "fp32"):
        names = [name for name in GRAPHS if (folder / f"{name}-{dtype}.onnx").is_file()]
        if not names:
            continue
        paths = {name: folder / f"{name}-{dtype}.onnx" for name in names}
        placements[dtype] = {name: placement(path, scratch, feed_of(BATCHES[0]))
                             for name, path in paths.items()}
        for name, where in placements[dtype].items():
            print("\n".join(placement_lines(f"{name}-{dtype}", where)), flush=True)
        memcpy = {name: len(where["copies"]) for name, where in placements[dtype].items()}
        sessions = {name: session(path) for name, path in paths.items()}
        for batch in BATCHES:
            feed = feed_of(batch)
            row = dict(dtype=dtype, batch=batch, length=LENGTH, memcpy_nodes=memcpy)
            outputs = {}
            for name, s in sessions.items():
                every_output = s.run(None, feed)
                outputs[name] = every_output[0].astype(np.float32)
                row[f"{name}_ms"] = median_ms(lambda: s.run(None, feed))
                binding = device_binding(s, feed)
                row[f"{name}{BOUND}_ms"] = median_ms(lambda: s.run_with_iobinding(binding))
                captures.append((row, name, paths[name], feed,
                                 [(o.shape, o.dtype) for o in every_output]))
            row["op_vs_portable_max_abs"] = float(np.abs(outputs["mra-op"] - outputs["mra-portable"]).max())
            rows.append(row)
            print(json.dumps(row), flush=True)
        sessions.clear()  # their memory arenas go before the next sessions'
    # Captured last: a capture that fails inside a kernel may leave the CUDA context unusable.
    for row, name, path, feed, output_types in captures:
        replayed = replayed_ms(lambda: session(path, cuda_graph=True), feed, output_types)
        row[f"{name}{CAPTURED}_ms" if isinstance(replayed, float)
            else f"{name}{CAPTURED}_refused"] = replayed
        print(f"{name}, {row['dtype']}, batch {row['batch']}, replayed: {replayed}", flush=True)
    for row in rows:
        for timing in TIMINGS:
            row.update(ratios(row, timing))
    return dict(onnxruntime=ort.__version__, rows=rows, placements=placements)


def ratios(row: dict, timing: str) -> dict:
    """The graphs' time ratios of ``row``, from its ``timing`` (one of TIMINGS), under keys
    ending in ``timing``."""
    ms = {name: row.get(f"{name}{timing}_ms") for name in GRAPHS}
    return {f"{key}{timing}": ms[top] / ms[bottom] for key, (top, bottom) in RATIOS.items()
            if ms[top] is not None and ms[bottom] is not None}


def feed_of(batch: int) -> dict:
    rng = np.random.default_rng(batch)
    return {"input_ids": rng.integers(5, 1000, (batch, LENGTH), dtype=np.int64),
            "attention_mask": np.ones((batch, LENGTH), dtype=np.int64)}


def markdown(result: dict) -> str:
    title = (f"# onnxruntime {result['onnxruntime']} CUDA provider, 1 layer of mra-base, "
             f"{LENGTH} tokens (ms)")
    lines = [title, "", "Inputs on the GPU and outputs left there (I/O binding): the graphs' own "
             "time, which issue 25's 0.7x is judged on.", ""]
    lines += speed_table(result["rows"], BOUND, extra=True)
    lines += ["", "The same, captured once as a CUDA graph and replayed (the CUDA provider's "
              "enable_cuda_graph, for fixed shapes): no launch from the host per node.", ""]
    lines += speed_table(result["rows"], CAPTURED)
    lines += [f"- {name}, {r['dtype']}, batch {r['batch']}: {r[f'{name}{CAPTURED}_refused']}"
              for r in result["rows"] for name in GRAPHS if f"{name}{CAPTURED}_refused" in r]
    lines += ["", "From the host (session.run: the inputs copied to the GPU, the outputs back), as "
              "a numpy caller sees it.", ""]
    lines += speed_table(result["rows"], "")
    placements = result.get("placements", {})
    if placements:
        lines += ["", "Placement: the copies the CUDA provider inserted (from its optimized graph) "
                  "and the nodes a profiled run shows on the CPU provider.", ""]
        for dtype, graphs in placements.items():
            for name, where in graphs.items():
                lines += placement_lines(f"{name}-{dtype}", where)
    return "\n".join(lines) + "\n"


def speed_table(rows: list[dict], timing: str, extra: bool = False) -> list[str]:
    """A markdown table of the rows' times and ratios for ``timing`` (see ``ratios``); ``extra``
    adds the op's distance to the portable graph and the Memcpy nodes. Rows without that timing
    (results of earlier versions of this script) read "not run"."""
    def cell(row, key, form):
        return form.format(row[key]) if key in row else "not run"

    header = ("| dtype | batch | MRA portable | MRA + op | dense | portable / op | op / dense | "
              "portable / dense (issue 25: <= 0.7x) |")
    lines = [header + (" op vs portable max abs | Memcpy nodes (portable, op, dense) |"
                       if extra else ""),
             "|---" * (10 if extra else 8) + "|"]
    for r in rows:
        cells = [r["dtype"], str(r["batch"])]
        cells += ["refused" if f"{name}{timing}_refused" in r
                  else cell(r, f"{name}{timing}_ms", "{:.2f}") for name in GRAPHS]
        cells += [cell(r, f"{key}{timing}", "{:.2f}x") for key in RATIOS]
        if extra:
            cells += [f"{r['op_vs_portable_max_abs']:.1e}",
                      ", ".join(str(r["memcpy_nodes"].get(n, "-")) for n in GRAPHS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("export", "run", "scans"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--dtypes", default="fp16", help="export: fp16, fp32 or both (fp16,fp32)")
    parser.add_argument("--graphs", default="mra-portable,mra-op",
                        help=f"export: which of {', '.join(GRAPHS)} (dense: RoBERTa's)")
    args = parser.parse_args(argv)
    if args.action == "export":
        names, dtypes = args.graphs.split(","), args.dtypes.split(",")
        if not set(names) <= set(GRAPHS):
            parser.error(f"--graphs takes {', '.join(GRAPHS)}, got {args.graphs}")
        if not set(dtypes) <= {"fp16", "fp32"}:
            parser.error(f"--dtypes takes fp16, fp32 or both, got {args.dtypes}")
        export(args.folder, dtypes, names)
        return 0
    if not any(args.folder.glob("*.onnx")):
        parser.error(f"{args.folder} holds no graph; make them with 'export {args.folder}'")
    if args.action == "run":
        import onnxruntime as ort

        from mra_export.runtime.ort import CUDA, NO_CUDA_PROVIDER

        if CUDA not in ort.get_available_providers():
            parser.error(f"run times onnxruntime's CUDA provider: {NO_CUDA_PROVIDER}")
    if args.action == "scans":
        print_scans(args.folder)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.folder)
    (args.out / "ort_cuda_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "ort_cuda_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
