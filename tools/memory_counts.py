#!/usr/bin/env python3
"""Shared-memory bank conflicts and global-memory sectors of the CUDA kernels, counted on the
CPU: the kernels' source under the CUDA emulation with every load and store hooked
(plugins/tests/cuda_emulation/memoryCountsDriver.cpp and memoryCounts.cpp). Each warp-wide
shared-memory instruction's wavefronts, and each global one's 32-byte sectors, are counted as
Nsight Compute counts them; the excess over the ideal is what ncu's
``l1tex__data_bank_conflicts_pipe_lsu_mem_shared`` metrics report for shared memory, and what
its "uncoalesced global accesses" rule reports for global memory.

    python tools/memory_counts.py                 # the attention's kernels, small problems
    python tools/memory_counts.py --patterns      # the driver's known patterns
    python tools/memory_counts.py --profile       # tools/kernel_profile.py's case at batch 1, whose
                                                  # Nsight Compute tables gpu_session.sh saves
    python tools/memory_counts.py --out FILE.md   # the tables, also written to FILE.md

One row per kernel, source line (the kernel's call chain into the kernels' source) and access;
only rows with an excess unless --all; then each kernel's totals. Needs GCC (its
-fsanitize=kernel-address hooks) and binutils' addr2line; no GPU.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mra_export import native  # noqa: E402
from mra_export.errors import UserError  # noqa: E402

PROGRAM = "mra_emulation_memory_counts"
KERNELS_SOURCE = "mraAttentionKernels.cu"
# What a space's instructions take, and what ncu calls it.
UNITS = {"shared": "wavefronts", "global": "sectors"}


@dataclass
class Instruction:
    """One instruction's warp-wide runs in one memory space: ``taken`` wavefronts (shared) or
    32-byte sectors (global) for ``ideal`` (shared: one a phase of 128 bytes; global: as many as
    the lanes' bytes fill); ``worst``, the most one phase (shared) or one request (global) took."""

    space: str
    offset: int
    store: bool
    bytes: int
    requests: int
    taken: int
    ideal: int
    worst: int
    function: str = ""  # the function the instruction is compiled into (its kernel)
    chain: tuple[str, ...] = ()  # file:line from that function inwards

    @property
    def excess(self) -> int:
        return self.taken - self.ideal

    @property
    def access(self) -> str:
        return f"{'store' if self.store else 'load'} {self.bytes}"


def kernel_name(demangled: str) -> str:
    """A demangled function's name as the tables print it: "highResolutionMma<__half, 64, 2>"."""
    return re.sub(r"^void |\(anonymous namespace\)::|\b(mra|emu)::|\(.*$", "", demangled)


def program() -> Path:
    """The driver, built by CMake where GCC has the hooks (UserError otherwise)."""
    return native.ensure_built(PROGRAM, PROGRAM)


def parse_counts(stdout: str) -> list[Instruction]:
    instructions = []
    for line in stdout.splitlines():
        space, _, rest = line.partition(" ")
        if space in UNITS:
            offset, kind, *numbers = rest.split()
            size, requests, taken, ideal, worst = map(int, numbers)
            instructions.append(Instruction(space, int(offset, 16), kind == "store", size, requests,
                                            taken, ideal, worst))
    return instructions


@dataclass(frozen=True)
class Launch:
    """The launches of one kernel with one shape: threads a CTA, dynamic shared memory."""

    function: str
    threads: int
    dynamic_shared: int


def frames(executable: Path, offsets: set[int]) -> dict[int, list[tuple[str, str]]]:
    """Each offset's inlined frames, innermost first, as (function, file:line), from the
    program's debug information (one addr2line for all)."""
    if not offsets:
        return {}
    if shutil.which("addr2line") is None:
        raise UserError("addr2line is not on PATH: install binutils to name the instructions' source")
    result = subprocess.run(
        ["addr2line", "-a", "-f", "-C", "-i", "-e", str(executable), *map(hex, sorted(offsets))],
        capture_output=True, text=True, check=True)
    lines_by_offset: dict[int, list[str]] = {}
    current: list[str] = []
    for line in result.stdout.splitlines():
        if re.fullmatch(r"0x[0-9a-f]+", line):
            current = lines_by_offset.setdefault(int(line, 16), [])
        else:
            current.append(line)
    return {offset: list(zip(lines[0::2], lines[1::2])) for offset, lines in lines_by_offset.items()}


def locate(executable: Path, instructions: list[Instruction]) -> None:
    """Sets each instruction's function and call chain (file:line from the function inwards)."""
    found = frames(executable, {i.offset for i in instructions})
    for instruction in instructions:
        chain = found.get(instruction.offset)
        if chain:
            instruction.function = kernel_name(chain[-1][0])
            instruction.chain = tuple(Path(where.split(" ")[0]).name for _, where in reversed(chain))


def driver_output(what: str) -> tuple[Path, str]:
    """The driver and what it printed for ``what`` ("attention", "patterns" or "profile"), run once
    a process for each build of it (run() and run_launches() read the same output)."""
    executable = program()
    return executable, cached_driver_output(executable, executable.stat().st_mtime_ns, what)


@functools.lru_cache(maxsize=None)
def cached_driver_output(executable: Path, built: int, what: str) -> str:
    """``executable``'s output for ``what``; ``built``, its modification time, keys the cache."""
    try:
        result = subprocess.run([str(executable), what], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise UserError(f"{executable.name} {what} ran past 15 minutes") from None
    if result.returncode != 0 or f"ran {what}" not in result.stdout:
        raise UserError(f"{executable.name} {what} failed (exit {result.returncode}): "
                        f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def run(what: str = "attention") -> list[Instruction]:
    """The driver's counts for ``what``, located in the source."""
    executable, stdout = driver_output(what)
    instructions = parse_counts(stdout)
    locate(executable, instructions)
    return instructions


@dataclass(frozen=True)
class OccupancyAnswer:
    """The emulated GPU's answer to cudaOccupancyMaxActiveBlocksPerMultiprocessor for a kernel."""

    function: str
    threads: int
    dynamic_shared: int
    ctas: int


def run_launches(what: str = "attention") -> tuple[list[Launch], list[OccupancyAnswer]]:
    """The driver's launches for ``what``, by kernel and shape, and the occupancy queries the
    kernels' host code made, with the emulation's answers."""
    executable, stdout = driver_output(what)
    records = {kind: [line.split()[1:] for line in stdout.splitlines() if line.startswith(kind + " ")]
               for kind in ("launch", "occupancy")}
    names = frames(executable, {int(fields[0], 16) for kind in records.values() for fields in kind})

    def name(offset: str) -> str:  # the outermost frame: the kernel, whatever is inlined at its entry
        return kernel_name(names[int(offset, 16)][-1][0])

    if not records["launch"]:
        raise UserError(f"{executable.name} {what} listed no launches: rebuild it (make plugins)")
    launches = [Launch(name(offset), int(threads), int(shared))  # the cluster and the count unread
                for offset, threads, shared, *_ in records["launch"]]
    answers = [OccupancyAnswer(name(offset), int(threads), int(shared), int(ctas))
               for offset, threads, shared, ctas in records["occupancy"]]
    return launches, answers


def kernel_lines(instruction: Instruction) -> str:
    """Its chain's lines in the kernels' source, outermost first ("1464 > 1042")."""
    lines = [where.split(":")[1] for where in instruction.chain
             if where.startswith(KERNELS_SOURCE + ":")]
    return " > ".join(dict.fromkeys(lines)) or " > ".join(instruction.chain)


def table(instructions: list[Instruction], space: str, every_row: bool = False) -> str:
    """A space's instructions, summed by kernel, source lines and access."""
    unit = UNITS[space]
    rows: dict[tuple[str, str, str], list[int]] = {}
    for i in instructions:
        if i.space == space:
            row = rows.setdefault((i.function, kernel_lines(i), i.access), [0, 0, 0, 0])
            row[0] += i.requests
            row[1] += i.taken
            row[2] += i.ideal
            row[3] = max(row[3], i.worst)
    worst = "worst phase" if space == "shared" else "most a request"
    out = [f"| kernel | source lines | access | requests | {unit} | ideal | excess | {worst} |",
           "|---|---|---|---|---|---|---|---|"]
    total = [0, 0]
    for (function, lines, access), (requests, taken, ideal, most) in sorted(rows.items()):
        total[0] += taken
        total[1] += ideal
        if taken > ideal or every_row:
            out.append(f"| {function} | {lines} | {access} | {requests} | {taken} | {ideal} "
                       f"| {taken - ideal} | {most} |")
    excess = total[0] - total[1]
    out.append(f"\nAll {space}-memory instructions: {total[0]} {unit}, {total[1]} ideal "
               f"({excess} more, {100 * excess / max(total[1], 1):.1f}%).")
    return "\n".join(out)


def by_kernel(instructions: list[Instruction], space: str) -> str:
    """Each kernel's count in a space, all its instructions together."""
    unit = UNITS[space]
    sums: dict[str, list[int]] = {}
    for i in instructions:
        if i.space == space:
            row = sums.setdefault(i.function, [0, 0, 0])
            row[0] += i.requests
            row[1] += i.taken
            row[2] += i.ideal
    out = [f"| kernel | requests | {unit} | ideal | excess |", "|---|---|---|---|---|"]
    for function, (requests, taken, ideal) in sorted(sums.items()):
        out.append(f"| {function} | {requests} | {taken} | {ideal} | "
                   f"{100 * (taken - ideal) / max(taken, 1):.1f}% |")
    return "\n".join(out)


def report(instructions: list[Instruction], every_row: bool = False, totals: bool = True) -> str:
    parts = []
    for space in UNITS:
        parts.append(f"## {space.capitalize()} memory: {UNITS[space]}\n\n"
                     + table(instructions, space, every_row))
        if totals:
            parts.append(by_kernel(instructions, space))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--patterns", action="store_true", help="the driver's known patterns")
    which.add_argument("--profile", action="store_true",
                       help="tools/kernel_profile.py's case at batch 1 (fp16, 12 heads, 4096 tokens)")
    parser.add_argument("--all", action="store_true", help="rows without an excess as well")
    parser.add_argument("--out", type=report_path, help="also write the tables here")
    args = parser.parse_args(argv)

    def tables() -> str:
        instructions = run("patterns" if args.patterns else "profile" if args.profile else "attention")
        return report(instructions, every_row=args.all or args.patterns, totals=not args.patterns)

    return write_report(tables, args.out)


def report_path(text: str) -> Path:
    """An --out argument: a file in a folder that exists (argparse's one-line error otherwise)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent}; make it first")
    return path


def write_report(make: Callable[[], str], out: Path | None) -> int:
    """Prints ``make()``'s report and writes it to ``out`` (where given); or prints its failure in
    one line, writing nothing. The exit status."""
    try:
        text = make()
        if out:
            out.write_text(text + "\n")
    except (UserError, OSError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
