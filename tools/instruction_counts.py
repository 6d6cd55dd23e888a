#!/usr/bin/env python3
"""The instructions a warp of each high-resolution kernel issues for one key block, as nvcc
compiled them: a stand-in, without a GPU, for Nsight Compute's instruction counts.

A kernel whose warps wait on each other's instructions rather than on memory or the tensor cores
goes as fast as it issues: an SM sub-partition issues one warp instruction a cycle. This tool
disassembles the built CUDA library's kernels for one architecture (cuobjdump, nvdisasm), finds
each high-resolution kernel's key-block loop (the backward branch around the most products:
HMMA in the tensor-core kernels, FFMA in the fp32 ones) and walks its control-flow paths from the
loop's head to a branch back to it. Of the paths that run the most products and then the most
copies (LDGSTS), it gives the fewest and the most instructions: in the tensor-core kernels a key
block with every key real where no row of the warp moves its softmax base, and one with padding
keys that moves one (docs/gpu.md). A
divergent warp's fallback (BRA.DIV) and a division's slow path (a CALL, counted as one
instruction) are left out. Also, once a CTA, the most instructions before the loop and after it
(over the same choice of paths, and one pass of each loop there: the first copies' and the
output's), and the kernel's FCHK: each IEEE division x / y checks its range with one (a
reciprocal, 1 / y, does not). An fp32 kernel whose key-block loop holds a loop of its own (nvcc
did not unroll it: the split one at head_dim 32) is listed as not counted; in a tensor-core
kernel that is an error.

    python tools/instruction_counts.py [--arch sm_90] [--out FILE.md]

Needs the CUDA library (make plugins with nvcc) and what tools/sass_accesses.py needs; no GPU.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import memory_counts  # noqa: E402
import sass_accesses  # noqa: E402
from mra_export import native  # noqa: E402
from mra_export.errors import UserError  # noqa: E402

# A branch's own condition, an operand before its target: `BRA !P3, `(.L_x_7)`.
BRANCH_CONDITION = re.compile(r"^\s*(!?U?P\w+)\s*,")


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "", "@P0", "@!P1", "@PT"; "@!PT" never runs
    opcode: str  # "HMMA.16816.F32"
    target: int | None  # a branch's or call's address
    condition: str = ""  # a branch's condition operand ("!P3"), where it has one

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def runs(self) -> bool:
        return self.predicate != "@!PT"

    @property
    def conditional(self) -> bool:
        return self.predicate not in ("", "@PT") or self.condition not in ("", "PT")


def parse(text: str) -> dict[str, list[Instruction]]:
    """nvdisasm -c's kernels (demangled names, as memory_counts names them) and their
    instructions in address order, each branch's label resolved to its address in its kernel."""
    raw: dict[str, list[tuple[int, str, str, str | None, str]]] = {}
    labels: dict[str, dict[str, int]] = {}  # by kernel: addresses restart at 0 in each
    function, pending = "", []
    for line in text.splitlines():
        if found := sass_accesses.FUNCTION.match(line.strip()):
            function, pending = found.group(1), []  # a label still pending at a kernel's end is dropped
            raw[function], labels[function] = [], {}
        elif found := sass_accesses.LABEL.match(line):
            pending.append(found.group(1))
        elif (found := sass_accesses.INSTRUCTION.search(line)) and function:
            address = int(found.group(1), 16)
            labels[function].update((label, address) for label in pending)
            pending = []
            operands = found.group(4)
            target = sass_accesses.LABEL_USE.search(operands)
            condition = BRANCH_CONDITION.match(operands) if found.group(3).startswith("BRA") else None
            raw[function].append((address, found.group(2) or "", found.group(3), target and target.group(1),
                                  condition.group(1) if condition else ""))
    names = sass_accesses.kernel_names(raw)
    return {names[name]: [
        Instruction(address, predicate, opcode, resolve(labels[name], target, names[name]), condition)
        for address, predicate, opcode, target, condition in instructions] for name, instructions in raw.items()}


def resolve(labels: dict[str, int], target: str | None, function: str) -> int | None:
    if target is None:
        return None
    if target not in labels:
        raise UserError(f"{function} branches to {target}, which it does not "
                        "hold: is this nvdisasm -c's output?")
    return labels[target]


def successors(instructions: list[Instruction]) -> list[list[int]]:
    """For each instruction, the indices control may go to next on a converged warp's usual path:
    a divergent warp's fallback (BRA.DIV) and a call's callee are not followed."""
    at = {instruction.address: index for index, instruction in enumerate(instructions)}
    graph = []
    for index, here in enumerate(instructions):
        following = [index + 1] if index + 1 < len(instructions) else []
        if not here.runs or here.condition == "!PT":
            graph.append(following)
        elif here.base in ("EXIT", "RET"):
            graph.append(following if here.conditional else [])
        elif here.base == "BRA" and not here.opcode.startswith("BRA.DIV"):
            taken = [at[here.target]] if here.target in at else []
            graph.append(following + taken if here.conditional else taken)
        else:
            graph.append(following)
    return graph


@dataclass(frozen=True)
class Walk:
    """What one path through a kernel's instructions runs: how many of each base opcode."""
    opcodes: Counter  # "FMUL": how many
    work_opcode: str = "HMMA"  # the products' (FFMA in the fp32 kernels)

    @property
    def work(self) -> int:
        return self.opcodes[self.work_opcode]

    @property
    def copies(self) -> int:
        return self.opcodes["LDGSTS"]

    @property
    def length(self) -> int:
        return sum(self.opcodes.values())

    def __add__(self, other: Walk) -> Walk:
        return Walk(self.opcodes + other.opcodes, self.work_opcode)


def step(instruction: Instruction, work: str) -> Walk:
    return Walk(Counter({instruction.base: 1} if instruction.runs else {}), work)


ORDERS = ((lambda walk: (walk.work, walk.copies, -walk.length)),  # the fewest instructions
          (lambda walk: (walk.work, walk.copies, walk.length)))  # the most


def extreme_paths(instructions: list[Instruction], graph: list[list[int]], first: int,
                  ends: list[int], work: str = "HMMA") -> tuple[Walk, Walk] | None:
    """Of the forward paths from ``first`` to any of ``ends`` (indices; backward branches cut),
    those with the most ``work`` (an opcode) and then the most copies: the one with the fewest
    instructions and the one with the most. None where no end can be reached."""
    last = max(ends)
    best: list[dict[int, Walk]] = [{first: step(instructions[first], work)} for _ in ORDERS]
    for index in range(first, last):
        for order, reached in zip(ORDERS, best):
            if index not in reached:
                continue
            for following in graph[index]:
                if index < following <= last:  # forward only: a branch back ends the path
                    candidate = reached[index] + step(instructions[following], work)
                    if following not in reached or order(candidate) > order(reached[following]):
                        reached[following] = candidate
    found = [[reached[end] for end in ends if end in reached] for reached in best]
    if not found[0]:
        return None
    return max(found[0], key=ORDERS[0]), max(found[1], key=ORDERS[1])


class NestedLoop(UserError):
    """A kernel's key-block loop holds a loop: its iterations' counts are not one path's."""


@dataclass(frozen=True)
class KernelCounts:
    kernel: str
    key_block: tuple[Walk, Walk]  # the fewest and the most
    before: int  # at most, from the kernel's first instruction to the loop's head
    after: int  # at most, from the loop's exit to an EXIT
    divisions: int  # FCHK: each IEEE division x / y's range check


def reachable(graph: list[list[int]]) -> set[int]:
    """The instructions a converged warp can reach from the kernel's first."""
    seen, stack = {0}, [0]
    while stack:
        for following in graph[stack.pop()]:
            if following not in seen:
                seen.add(following)
                stack.append(following)
    return seen


def key_block_loop(kernel: str, instructions: list[Instruction], graph: list[list[int]],
                   work: str = "HMMA") -> tuple[int, list[int]]:
    """The head and the backward branches (indices) of the loop around the most ``work`` (the
    narrowest of equals), among the branches back a converged warp reaches and takes: not a
    divergent warp's fallback code jumping back, nor the spin after EXIT. Several branches back
    to one head (a `continue`) are one loop, each the end of an iteration."""
    reached = reachable(graph)
    backs: dict[int, list[int]] = {}  # the graph's edges back, which successors() took
    for index in sorted(reached):
        for following in graph[index]:
            if following <= index:
                backs.setdefault(following, []).append(index)
    loops = [(head, ends[-1]) for head, ends in backs.items()]
    products = {(head, back): sum(instructions[i].base == work and instructions[i].runs
                                  for i in range(head, back + 1) if i in reached) for head, back in loops}
    if not loops or max(products.values()) == 0:
        raise UserError(f"{kernel} has no loop of products ({work}): is the library built from these sources?")
    head, back = max(loops, key=lambda loop: (products[loop], loop[0] - loop[1]))
    if any(head < inner_head and inner_back < back for inner_head, inner_back in loops):
        raise NestedLoop(f"{kernel}'s key-block loop at {instructions[head].address:#x} holds another loop: "
                         "this tool counts a loop whose body nvcc unrolled")
    return head, backs[head]


def most_instructions(kernel: str, instructions: list[Instruction], graph: list[list[int]], first: int,
                      ends: list[int], what: str, work: str) -> int:
    paths = extreme_paths(instructions, graph, first, ends, work) if ends else None
    if paths is None:
        raise UserError(f"{kernel}: no forward path {what}: this tool counts a loop entered at its head")
    return paths[1].length


def count(kernel: str, instructions: list[Instruction], work: str = "HMMA") -> KernelCounts:
    """``kernel``'s counts, its products being ``work`` instructions (an opcode)."""
    graph = successors(instructions)
    head, backs = key_block_loop(kernel, instructions, graph, work)
    key_block = extreme_paths(instructions, graph, head, backs, work)
    if key_block is None:
        raise UserError(f"{kernel}'s key-block loop at {instructions[head].address:#x} has no path to its "
                        "backward branch")
    back = backs[-1]
    exits = [i for i, instruction in enumerate(instructions)
             if instruction.base == "EXIT" and instruction.runs and i > back]
    before = 0 if head == 0 else most_instructions(kernel, instructions, graph, 0, [head], "to the loop's head",
                                                   work) - 1
    return KernelCounts(
        kernel, key_block,
        before=before,  # the loop's head is the loop's, not before it
        after=most_instructions(kernel, instructions, graph, back + 1, exits, "from the loop to an EXIT", work),
        divisions=sum(i.base == "FCHK" for i in instructions))


# The high-resolution kernels by the start of their names: their products' opcode, and whether
# their key-block loop may hold a loop nvcc did not unroll (highResolutionFma<32, 2>'s loop over
# dims, nvcc's choice; a tensor-core kernel's would be a fault).
FAMILIES = {"highResolutionFma<": ("FFMA", True), "highResolutionMma<": ("HMMA", False)}


def counts(library: Path, arch: str) -> tuple[list[KernelCounts], list[str]]:
    """Each high-resolution kernel's counts in ``library``'s cubin for ``arch``, and the fp32
    kernels not counted, their key-block loops holding loops (NestedLoop for a tensor-core one)."""
    kernels = parse(sass_accesses.disassemble(library, arch, lines=False))
    rows, nested = [], []
    for prefix, (work, may_nest) in FAMILIES.items():
        for name in sorted(name for name in kernels if name.startswith(prefix)):
            try:
                rows.append(count(name, kernels[name], work))
            except NestedLoop:
                if not may_nest:
                    raise
                nested.append(name)
    if not rows and not nested:
        raise UserError(f"{library.name} has no high-resolution kernels for {arch}: rebuild it with make plugins")
    return rows, nested


def report(arch: str, rows: list[KernelCounts], nested: list[str]) -> str:
    lines = [f"# Instructions a warp issues, {arch}", "",
             f"Command: `python tools/instruction_counts.py --arch {arch}` (nvdisasm over the built CUDA "
             "library; no GPU). A key block: the fewest and the most instructions over the loop's paths "
             "that run the most products (HMMA; FFMA in fp32) and copies (in the tensor-core kernels: "
             "every key real, no base moved / padding keys, a base moved). Before and "
             "after the loop: the most, once a CTA, one pass of each loop there. A division's slow path is "
             "one CALL; a divergent warp's fallback is left out. "
             "What it means: [docs/gpu.md](../../docs/gpu.md).", "",
             "| kernel | a key block: fewest, most | of which HMMA / FFMA | before the loop | "
             "after the loop | FCHK |", "|---|---|---|---|---|---|"]
    for row in rows:
        fewest, most = row.key_block
        lines.append(f"| {row.kernel} | {fewest.length}, {most.length} | {fewest.work} | "
                     f"{row.before} | {row.after} | {row.divisions} |")
    if nested:
        lines += ["", "Not counted (a loop in the key-block loop, which nvcc did not unroll): "
                  + ", ".join(nested) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sass_accesses.parse_report_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), argv)
    return memory_counts.write_report(
        lambda: report(args.arch, *counts(native.library_path(native.CUDA_LIBRARY), args.arch)), args.out)


if __name__ == "__main__":
    sys.exit(main())
