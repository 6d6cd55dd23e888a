#!/usr/bin/env python3
"""Shared-memory bank conflicts of the CUDA kernels, counted on the CPU: the kernels' source
under the CUDA emulation with every load and store hooked (plugins/tests/cuda_emulation/
bankcheckDriver.cpp and sharedBanks.cpp), each warp-wide shared-memory instruction's wavefronts
counted as Nsight Compute counts them. What ncu's
``l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{ld,st}`` would report is the excess column.

    python tools/shared_banks.py                 # the attention's kernels, small problems
    python tools/shared_banks.py --patterns      # the driver's known patterns
    python tools/shared_banks.py --out FILE.txt  # the table, also written to FILE.txt

One row per kernel and source line (the kernel's call chain into the kernels' source); only rows
with conflicts unless --all. Needs GCC (its -fsanitize=kernel-address hooks) and binutils'
addr2line; no GPU.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mra_export import native  # noqa: E402
from mra_export.errors import UserError  # noqa: E402

PROGRAM = "mra_emulation_bankcheck"
KERNELS_SOURCE = "mraAttentionKernels.cu"


@dataclass
class Instruction:
    """One shared-memory instruction's warp-wide runs: ``wavefronts`` over ``ideal`` (one a
    phase of 128 bytes) is its conflicts' cost; ``worst``, the most wavefronts one phase took."""

    offset: int
    store: bool
    bytes: int
    requests: int
    wavefronts: int
    ideal: int
    worst: int
    function: str = ""  # the function the instruction is compiled into (its kernel)
    chain: tuple[str, ...] = ()  # file:line from that function inwards

    @property
    def excess(self) -> int:
        return self.wavefronts - self.ideal

    @property
    def access(self) -> str:
        return f"{'store' if self.store else 'load'} {self.bytes}"


def program() -> Path:
    """The driver, built by CMake where GCC has the hooks (UserError otherwise)."""
    return native.ensure_built(PROGRAM, PROGRAM)


def parse_counts(stdout: str) -> list[Instruction]:
    instructions = []
    for line in stdout.splitlines():
        if line.startswith("shared "):
            _, offset, kind, *numbers = line.split()
            size, requests, wavefronts, ideal, worst = map(int, numbers)
            instructions.append(Instruction(int(offset, 16), kind == "store", size, requests,
                                            wavefronts, ideal, worst))
    return instructions


def locate(executable: Path, instructions: list[Instruction]) -> None:
    """Sets each instruction's function and call chain from the program's debug information
    (one addr2line for all: its inlined frames innermost first, each a name and a file:line)."""
    if not instructions:
        return
    if shutil.which("addr2line") is None:
        raise UserError("addr2line is not on PATH: install binutils to name the instructions' source")
    result = subprocess.run(
        ["addr2line", "-a", "-f", "-C", "-i", "-e", str(executable),
         *(hex(i.offset) for i in instructions)], capture_output=True, text=True, check=True)
    frames_by_offset: dict[int, list[tuple[str, str]]] = {}
    current: list[str] = []
    for line in result.stdout.splitlines():
        if re.fullmatch(r"0x[0-9a-f]+", line):
            current = []
            frames_by_offset[int(line, 16)] = current  # type: ignore[assignment]
        else:
            current.append(line)
    for instruction in instructions:
        lines = frames_by_offset.get(instruction.offset, [])
        frames = list(zip(lines[0::2], lines[1::2]))  # (name, file:line), innermost first
        if not frames:
            continue
        instruction.function = re.sub(r"^void |\(anonymous namespace\)::|\b(mra|emu)::|\(.*$", "",
                                      frames[-1][0])
        instruction.chain = tuple(Path(where.split(" ")[0]).name for _, where in reversed(frames))


def run(what: str = "attention") -> list[Instruction]:
    """The driver's counts for ``what`` ("attention" or "patterns"), located in the source."""
    executable = program()
    result = subprocess.run([str(executable), what], capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or f"ran {what}" not in result.stdout:
        raise UserError(f"{executable.name} {what} failed (exit {result.returncode}): "
                        f"{result.stderr.strip() or result.stdout.strip()}")
    instructions = parse_counts(result.stdout)
    locate(executable, instructions)
    return instructions


def kernel_lines(instruction: Instruction) -> str:
    """Its chain's lines in the kernels' source, outermost first ("1464 > 1042")."""
    lines = [where.split(":")[1] for where in instruction.chain
             if where.startswith(KERNELS_SOURCE + ":")]
    return " > ".join(dict.fromkeys(lines)) or " > ".join(instruction.chain)


def table(instructions: list[Instruction], every_row: bool = False) -> str:
    rows: dict[tuple[str, str, str], list[int]] = {}
    for i in instructions:
        row = rows.setdefault((i.function, kernel_lines(i), i.access), [0, 0, 0, 0])
        row[0] += i.requests
        row[1] += i.wavefronts
        row[2] += i.ideal
        row[3] = max(row[3], i.worst)
    out = ["| kernel | source lines | access | requests | wavefronts | ideal | excess | worst phase |",
           "|---|---|---|---|---|---|---|---|"]
    total = [0, 0]
    for (function, lines, access), (requests, wavefronts, ideal, worst) in sorted(rows.items()):
        total[0] += wavefronts
        total[1] += ideal
        if wavefronts > ideal or every_row:
            out.append(f"| {function} | {lines} | {access} | {requests} | {wavefronts} | {ideal} "
                       f"| {wavefronts - ideal} | {worst}-way |")
    excess = total[0] - total[1]
    out.append(f"\nAll shared-memory instructions: {total[0]} wavefronts, {total[1]} ideal "
               f"({excess} in conflicts, {100 * excess / max(total[1], 1):.1f}%).")
    return "\n".join(out)


def by_kernel(instructions: list[Instruction]) -> str:
    """Each kernel's shared-memory wavefronts, all its instructions together."""
    sums: dict[str, list[int]] = {}
    for i in instructions:
        row = sums.setdefault(i.function, [0, 0, 0])
        row[0] += i.requests
        row[1] += i.wavefronts
        row[2] += i.ideal
    out = ["| kernel | requests | wavefronts | ideal | in conflicts |", "|---|---|---|---|---|"]
    for function, (requests, wavefronts, ideal) in sorted(sums.items()):
        out.append(f"| {function} | {requests} | {wavefronts} | {ideal} | "
                   f"{100 * (wavefronts - ideal) / max(wavefronts, 1):.1f}% |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patterns", action="store_true", help="the driver's known patterns")
    parser.add_argument("--all", action="store_true", help="rows without conflicts as well")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    try:
        instructions = run("patterns" if args.patterns else "attention")
    except (UserError, OSError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = table(instructions, every_row=args.all or args.patterns)
    if not args.patterns:
        text += "\n\n" + by_kernel(instructions)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
