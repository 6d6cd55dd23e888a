#!/usr/bin/env python3
"""How many CTAs of each kernel an SM holds, on each architecture the CUDA library is built for,
without a GPU: NVIDIA's occupancy calculator (cuda_occupancy.h, through
plugins/tests/occupancyCalculator.cpp) over each kernel's registers and static shared memory in
the built library's cubins (cuobjdump -res-usage) and its threads and dynamic shared memory in
its launches (the memory-counts driver's problems, under the CUDA emulation).

    python tools/occupancy.py [--out FILE.md]

One row per kernel and launch shape: its registers, shared memory a CTA (static + dynamic), and
for each architecture the CTAs an SM with what bounds them (registers, shared memory, warps, the
SM's CTA limit). Few CTAs an SM is few key blocks in flight: the high-resolution kernels wait on
memory, and their split decision counts these CTAs (launchHighResolution). Needs the CUDA library
(make plugins with nvcc, which also builds the calculator) and what tools/sass_accesses.py
needs; no GPU.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import memory_counts  # noqa: E402
import sass_accesses  # noqa: E402
from mra_export import native  # noqa: E402
from mra_export.errors import UserError  # noqa: E402

CALCULATOR = "mra_occupancy_calculator"
RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:\d+ SHARED:(\d+)")
# From sm_90 on, a cubin's static shared memory includes the kilobyte the driver reserves a CTA
# (ptxas reports it without; cudaFuncGetAttributes too), which the calculator adds itself.
RESERVED_IN_CUBIN = {"sm_90": 1024}
LIMITS = ("warps", "registers", "shared memory", "CTAs an SM", "barriers")


@dataclass(frozen=True)
class Resources:
    registers: int
    static_shared: int


@dataclass(frozen=True)
class Occupancy:
    ctas: int
    limits: dict[str, int]  # the most CTAs each resource alone allows (-1: unlimited)

    @property
    def bound_by(self) -> str:
        return ", ".join(name for name, ctas in self.limits.items() if ctas == self.ctas) or "-"


def resources(library: Path, arch: str) -> dict[str, Resources]:
    """Each kernel's registers and static shared memory (the driver's reserve left out)."""
    text = sass_accesses.read_cubin(library, arch, [sass_accesses.binary("cuobjdump"), "-res-usage"])
    found = RESOURCES.findall(text)
    names = sass_accesses.demangle([mangled for mangled, _, _ in found])
    reserved = RESERVED_IN_CUBIN.get(arch, 0)
    return {name: Resources(int(registers), int(shared) - reserved)
            for name, (_, registers, shared) in zip(names, found)}


def calculate(questions: list[tuple[str, Resources, int, int]]) -> list[Occupancy]:
    """cuda_occupancy.h's answer for each (arch, resources, threads, dynamic shared bytes)."""
    calculator = native.ensure_built(CALCULATOR, CALCULATOR)
    lines = [f"{arch.removeprefix('sm_')} {r.registers} {r.static_shared} {threads} {dynamic}"
             for arch, r, threads, dynamic in questions]
    result = subprocess.run([str(calculator)], input="\n".join(lines) + "\n", capture_output=True,
                            text=True, check=True)
    answers = []
    for line in result.stdout.splitlines():
        if line.startswith("error"):
            raise UserError(f"{CALCULATOR}: {line.removeprefix('error ')}")
        if not re.fullmatch(r"-?\d+( -?\d+){%d}" % len(LIMITS), line):
            raise UserError(f"{CALCULATOR} answered {line!r}: rebuild it with make plugins")
        ctas, *limits = map(int, line.split())
        answers.append(Occupancy(ctas, dict(zip(LIMITS, limits))))
    if len(answers) != len(questions):
        raise UserError(f"{CALCULATOR} answered {len(answers)} of {len(questions)} questions: "
                        f"{result.stderr.strip() or 'rebuild it with make plugins'}")
    return answers


@dataclass
class Row:
    launch: memory_counts.Launch
    resources: dict[str, Resources]  # by arch
    occupancy: dict[str, Occupancy]  # by arch


def rows(library: Path, launches: list[memory_counts.Launch]) -> list[Row]:
    """Each launch shape's occupancy on each architecture the library carries."""
    archs = sass_accesses.architectures(library)
    if not archs:
        raise UserError(f"{library.name} carries no cubins (cuobjdump -lelf lists none): rebuild it with make plugins")
    by_arch = {arch: resources(library, arch) for arch in archs}
    def shape(launch: memory_counts.Launch) -> tuple:
        return launch.function, launch.threads, launch.dynamic_shared

    shapes = sorted({shape(launch): launch for launch in launches}.values(), key=shape)
    questions, table = [], []
    for launch in shapes:
        missing = [arch for arch, kernels in by_arch.items() if launch.function not in kernels]
        if missing:
            raise UserError(f"{launch.function} ran under the emulation but is not in the library's "
                            f"{', '.join(missing)} cubins: rebuild with make plugins")
        table.append(Row(launch, {arch: kernels[launch.function] for arch, kernels in by_arch.items()}, {}))
        questions += [(arch, kernels[launch.function], launch.threads, launch.dynamic_shared)
                      for arch, kernels in by_arch.items()]
    answers = iter(calculate(questions))
    for row in table:
        row.occupancy = {arch: next(answers) for arch in by_arch}
    return table


def report(table: list[Row]) -> str:
    archs = list(table[0].occupancy) if table else []
    out = ["| kernel | threads | shared a CTA (bytes: static + dynamic) | "
           + " | ".join(f"{arch}: CTAs an SM (bound by), registers" for arch in archs) + " |",
           "|---|---|---|" + "---|" * len(archs)]
    for row in table:
        launch = row.launch
        static = "/".join(str(s) for s in sorted({r.static_shared for r in row.resources.values()}))
        cells = [f"{o.ctas} ({o.bound_by}), {row.resources[arch].registers}"
                 for arch, o in row.occupancy.items()]
        out.append(f"| {launch.function} | {launch.threads} | {static} + {launch.dynamic_shared} | "
                   + " | ".join(cells) + " |")
    out += ["", "Bound by: each resource that alone allows no more CTAs an SM."]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=memory_counts.report_path, help="also write the table here")
    args = parser.parse_args(argv)

    def table() -> str:
        library = native.library_path(native.CUDA_LIBRARY)
        launches, _ = memory_counts.run_launches("attention")
        return report(rows(library, launches))

    return memory_counts.write_report(table, args.out)


if __name__ == "__main__":
    sys.exit(main())
