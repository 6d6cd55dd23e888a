"""The ``mra-export`` command: export, quantize, parity, build, bench, triton, demo.

Problems the user can fix (bad input, missing files, TensorRT absent) print one line and exit 2;
a parity failure exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading

from . import __version__
from .errors import OneLineParser, UserError, first_line

EXIT_FAILED, EXIT_USAGE = 1, 2


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal), raised where the program is, so that outputs under a
    temporary name are removed on the way out as they are on Ctrl-C (Python's default for these
    runs no clean-up)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOPPING_SIGNALS = {signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)  # without torch: help and usage errors are quick
        _quiet_libraries()  # imports transformers (not torch): about 1.5 s on the 2-core machine
    except KeyboardInterrupt:
        return _interrupted()
    with _cleanup_on_stop():
        try:
            _check_environment()
            return args.run(args) or 0
        except UserError as error:
            print(f"mra-export {args.command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as error:  # the system's (disk full, a folder gone): one line, no trace
            print(f"mra-export {args.command}: error: {_os_error(error)}", file=sys.stderr)
            return EXIT_USAGE
        except (MemoryError, RuntimeError) as error:
            if not _out_of_memory(error):
                raise
            print(f"mra-export {args.command}: error: out of memory ({first_line(error)}); use "
                  "smaller sizes (lengths, batches, layers) or a machine with more memory",
                  file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            return _interrupted()


def _out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, or torch's allocators' RuntimeErrors (host and CUDA)."""
    import torch  # imported already: every command runs on it

    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "DefaultCPUAllocator: can't allocate memory" in str(error))


def _check_environment() -> None:
    """The environment's settings, before any work (a bad one would surface as a failed backend
    in parity, a failed cell in bench)."""
    from .runtime.ort import threads_from_environment

    threads_from_environment()


def _interrupted() -> int:
    print("interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


@contextlib.contextmanager
def _cleanup_on_stop():
    """Turn SIGTERM and SIGHUP into ``Terminated`` while a command runs (main thread only); after
    the clean-up the signal is delivered again under the previous handler, so the process still
    ends as killed by it. A second signal during the clean-up kills at once. A signal the process
    was started ignoring (SIGHUP under nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    restore = {signum: _handler_to_restore(signal.signal(signum, _raise_terminated))
               for signum in STOPPING_SIGNALS if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield
    except Terminated as stop:
        print(STOPPING_SIGNALS[stop.signum], file=sys.stderr)
        _restore_handlers(restore)
        os.kill(os.getpid(), stop.signum)
        raise SystemExit(128 + stop.signum) from None  # the previous handler did not exit
    finally:
        _restore_handlers(restore)


def _handler_to_restore(previous):
    return signal.SIG_DFL if previous is None else previous  # None: set outside Python


def _restore_handlers(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _os_error(error: OSError) -> str:
    """``[Errno 28] No space left on device: 'out/x'`` as ``out/x: No space left on device; free
    space there, or choose another output path``. A copy's error names the source first and the
    file written second: the second is where the disk is full."""
    if error.filename is None or not error.strerror:
        return str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        written = error.filename2 if error.filename2 is not None else error.filename
        return f"{written}: {error.strerror}; free space there, or choose another output path"
    if error.filename2 is not None:
        return f"{error.filename} -> {error.filename2}: {error.strerror}"
    return f"{error.filename}: {error.strerror}"


def _raise_terminated(signum, frame):
    for stopping in STOPPING_SIGNALS:
        signal.signal(stopping, signal.SIG_DFL)
    raise Terminated(signum)


def _export(args) -> int:
    from .export import export_model

    export_model(args.model, args.out, task=args.task, flavour=args.flavour, opset=args.opset,
                 dtype=args.dtype)
    return 0


def _quantize(args) -> int:
    from .export.quantize import quantize_export

    quantize_export(args.onnx, args.out, reduce_range=args.reduce_range)
    return 0


def _parity(args) -> int:
    from .parity import format_table, run_parity
    from .parity.report import check_report_path

    if args.report is not None:
        check_report_path(args.report)  # now, not after the comparison
    report = run_parity(args.model, args.onnx or (), args.engine or ())
    print(format_table([report]))  # before the report is written: a failed write loses no result
    if args.report is not None:
        report.save(args.report)
        print(f"report: {args.report}")
    if not report.checked:
        print("FAILED: no backend could run here, so nothing was checked (reasons above)")
    else:
        print("PASSED" if report.passed else "FAILED")
    return 0 if report.passed else EXIT_FAILED


def _build(args) -> int:
    from .engines.build import build_from_args

    build_from_args(args)
    return 0


def _bench(args) -> int:
    from .bench import run_bench_from_args

    run_bench_from_args(args)
    return 0


def _triton(args) -> int:
    from .serving.triton import run_triton_from_args

    run_triton_from_args(args)
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(args.out) else EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    from .export.info import DEFAULT_OPSET, FLAVOURS, SUPPORTED_OPSETS
    from .tasks import TASKS

    parser = OneLineParser(
        prog="mra-export", description="transformers' MRA models to ONNX, onnxruntime and "
        "TensorRT, with parity reports against PyTorch.")
    parser.add_argument("--version", action="version", version=f"mra-export {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = commands.choices

    export = commands.add_parser("export", help="export a local checkpoint to ONNX")
    export.add_argument("--model", required=True, help="local checkpoint folder (save_pretrained)")
    export.add_argument("--task", default="auto",
                        help=f"one of: auto, {', '.join(TASKS)} (default: auto, from the "
                        "config's architectures)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--flavour", choices=FLAVOURS, default="portable",
                        help="portable: standard ONNX ops (onnxruntime CPU/CUDA); plugin: one "
                        "MraAttention node per layer (TensorRT with the plugin, or onnxruntime "
                        "with libmra_attention_ort.so) (default: portable)")
    export.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="weights and activations of the graph (TensorRT 11 builds engines "
                        "in this type); the attention computes in float32 either way "
                        "(default: fp32)")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                        f"(default: {DEFAULT_OPSET})")
    export.set_defaults(run=_export)

    quantize = commands.add_parser(
        "quantize", help="int8 weight MatMuls of an fp32 portable export, for onnxruntime's CPU")
    quantize.add_argument("--onnx", required=True, metavar="OUT",
                          help="an fp32 portable export folder (mra-export export)")
    quantize.add_argument("--out", required=True, metavar="OUT8",
                          help="output folder for the int8 export (dynamic quantization: int8 "
                          "weights, activations quantized at run time; the attention stays "
                          "float32)")
    quantize.add_argument("--reduce-range", action="store_true",
                          help="7-bit weights, for x86 CPUs without VNNI, where 8-bit "
                          "ones can saturate onnxruntime's int8 products (docs/quantization.md)")
    quantize.set_defaults(run=_quantize)

    parity = commands.add_parser("parity", help="check exports and engines against PyTorch")
    parity.add_argument("--model", required=True, help="the checkpoint folder exported")
    parity.add_argument("--onnx", action="append", metavar="OUT",
                        help="an export folder (repeat for both flavours)")
    parity.add_argument("--engine", action="append", metavar="DIR",
                        help="an engine folder made by 'mra-export build' (repeatable)")
    parity.add_argument("--report", metavar="FILE", help="write the JSON report here")
    parity.set_defaults(run=_parity)

    from .engines.cli import add_build_arguments

    build = commands.add_parser("build", help="build a TensorRT engine from a plugin export")
    add_build_arguments(build)
    build.set_defaults(run=_build)

    from .bench import add_bench_arguments

    bench = commands.add_parser("bench", help="latency and memory against dense attention")
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)

    from .serving.arguments import add_triton_arguments

    triton = commands.add_parser("triton", help="a Triton Inference Server model repository for "
                                 "an export or an engine")
    add_triton_arguments(triton)
    triton.set_defaults(run=_triton)

    demo = commands.add_parser("demo", help="the whole pipeline on the built-in default model")
    demo.add_argument("--out", default="out/demo", help="working folder (default: out/demo)")
    demo.set_defaults(run=_demo)
    return parser


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
