#!/usr/bin/env python3
"""The CUDA kernels' memory instructions as nvcc compiled them, beside the ones the emulation
counts: are tools/memory_counts.py's counts the GPU's?

memory_counts counts the shared-memory wavefronts and global sectors of the kernels' source as GCC
compiles it under the CUDA emulation. Its counts hold for the GPU where nvcc compiled the same
accesses: each source statement loading and storing the same widths in both (a float4 one 16-byte
access, a float one 4-byte access, unless a compiler merged or split them). This tool disassembles
the built CUDA library's kernels for one architecture (cuobjdump, then ``nvdisasm -gi``: each
instruction with its chain of inlined source lines) and sets each statement's access widths, by
memory space and direction, beside the emulated build's on memory_counts' problems.

    python tools/sass_accesses.py [--arch sm_90] [--all] [--out FILE.md]

One row per statement where the two differ (every statement with --all), with a verdict: "same";
"wider in nvcc" (nvcc merged accesses that the emulation counts apart) or "narrower in nvcc";
"nvcc only" (code the problems do not run, or a stand-in's under the emulation: CUB's scan);
"emulation only"; and beside it where nvcc reads again bytes a wider load of the statement read
(ptxas re-loading a value instead of keeping it in a register: requests the counts lack). Then
what the counts do not model: each kernel's local-memory and generic
(address space unknown to the compiler) accesses. Needs the CUDA library (make plugins with nvcc),
NVIDIA's cuobjdump and nvdisasm (PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, which
`make setup` installs), binutils (c++filt, addr2line) and GCC's load and store hooks; no GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import memory_counts  # noqa: E402
from mra_export import native  # noqa: E402
from mra_export.errors import UserError  # noqa: E402

SOURCE_FOLDER = ROOT / "plugins" / "mra_attention"
# Where a primitive's GPU branch (inline PTX) and its emulated branch (a call) sit in one
# function; the two builds compile different lines of it by design.
EMULATION_BRANCH = "#ifdef MRA_CUDA_EMULATION_H"
# The binaries the tools run, and the PyPI distribution that carries each (binutils' c++filt: none).
BINARIES = {"cuobjdump": "nvidia-cuda-cuobjdump", "nvdisasm": "nvidia-cuda-nvdisasm", "c++filt": None}

FUNCTION = re.compile(r"^\.text\.(\S+):$")
LABEL = re.compile(r"^\s*(\.L_\w+):")
LABEL_USE = re.compile(r"`\((\.L_\w+)\)")
LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
# An instruction: its address, predicate, opcode and operands ("/*0b40*/ @P1 STG.E.U16 [R2.64], R5 ;").
INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# A shared-memory operand: its registers and an offset, "[R61+0x2aac]", "[R92.X4+0x52ac]", "[R40]",
# "[R3+UR4]", "[R3+-0x10]", "[0x10]".
SHARED_ADDRESS = re.compile(r"\[([^\]]*?)\s*(?:\+?\s*(-?0x[0-9a-f]+))?\]")
# An instruction's destination, its first operand where that is a register ("R9", "UR4"); a
# shuffle's comes after its predicate ("SHFL.BFLY PT, R125, R109, 0x1, 0x1f").
DESTINATION = re.compile(r"^\s*(U?R)(\d+)\b")
SHUFFLE_DESTINATION = re.compile(r"^\s*!?U?P\w+\s*,\s*(U?R)(\d+)\b")
# Registers a destination spans, by opcode suffix (a vector load, a wide product); one otherwise.
DESTINATION_WIDTHS = {"128": 4, "64": 2, "WIDE": 2}
# Opcodes that end a basic block (a label that an instruction names begins one); a barrier does
# not: both loads still run.
BLOCK_ENDS = {"BRA", "BRX", "BRXU", "JMP", "JMX", "JMXU", "EXIT", "RET", "CALL", "BSYNC", "BPT", "KILL"}
# A size suffix's bytes; an opcode without one moves 4 bytes a lane.
SIZE_SUFFIXES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
# Opcodes by what they access: (space, store) for each access, as memory_counts counts them
# (an atomic as a store; cp.async as its global read and its shared store).
ACCESSES = {"LDS": (("shared", False),), "LDSM": (("shared", False),), "STS": (("shared", True),),
            "ATOMS": (("shared", True),), "LDG": (("global", False),), "STG": (("global", True),),
            "RED": (("global", True),), "ATOMG": (("global", True),),
            "LDGSTS": (("global", False), ("shared", True)),
            "LDL": (("local", False),), "STL": (("local", True),),
            "LD": (("generic", False),), "ST": (("generic", True),), "ATOM": (("generic", True),)}
UNMODELLED_SPACES = ("local", "generic")


@dataclass(frozen=True)
class SassInstruction:
    function: str  # its kernel, named as memory_counts names it
    opcode: str  # "LDS.128"
    chain: tuple[tuple[str, int], ...]  # (file name, line), innermost first
    shared_operand: tuple[str, int] | None = None  # an LDS's registers and offset ("R61", 0x2aac)
    predicate: str = ""  # "@P0", "@!P1"
    block: int = 0  # its basic block, numbered in its kernel
    writes: frozenset[str] = frozenset()  # the registers it writes ("R4", ..., "R7")


@dataclass(frozen=True)
class Access:
    space: str
    store: bool
    bytes: int


def accesses(opcode: str) -> list[Access]:
    """What one SASS instruction reads and writes, a lane's bytes each (ldmatrix: a row's 16)."""
    base, *suffixes = opcode.split(".")
    size = 16 if base == "LDSM" else next((SIZE_SUFFIXES[s] for s in suffixes if s in SIZE_SUFFIXES), 4)
    return [Access(space, store, size) for space, store in ACCESSES.get(base, ())]


def binary(name: str) -> str:
    """``name`` (of BINARIES) from PATH or from its PyPI distribution (UserError where neither)."""
    found = shutil.which(name)
    if found:
        return found
    if BINARIES[name] is None:
        raise UserError(f"{name} is not on PATH: install binutils")
    try:
        files = importlib.metadata.files(BINARIES[name]) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == name:
            return str(file.locate())
    raise UserError(f"{name} is not on PATH: pip install {BINARIES[name]} (make setup does)")


def cubins(library: Path) -> dict[str, str]:
    """The cubins ``library`` carries, by architecture: {"sm_90": "mraAttentionKernels.sm_90.cubin"}."""
    listing = subprocess.run([binary("cuobjdump"), "-lelf", str(library)], capture_output=True, text=True)
    if listing.returncode != 0:
        said = (listing.stderr.strip().splitlines() or ["no message"])[0]
        raise UserError(f"cuobjdump cannot list {library.name}'s kernels ({said}): rebuild it with make plugins")
    names = re.findall(r"ELF file\s+\d+:\s+(\S+\.cubin)", listing.stdout)
    return {re.sub(r".*\.(sm_\w+)\.cubin", r"\1", name): name for name in names}


def architectures(library: Path) -> list[str]:
    return sorted(cubins(library))


def read_cubin(library: Path, arch: str, command: list[str]) -> str:
    """What ``command`` + [the path of ``library``'s cubin for ``arch`` ("sm_90")] prints."""
    carried = cubins(library)
    if arch not in carried:
        raise UserError(f"{library.name} has no {arch} kernels (it has: {', '.join(sorted(carried)) or 'none'}); "
                        "pick one with --arch, or rebuild with MRA_CUDA_ARCHITECTURES")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([binary("cuobjdump"), "-xelf", carried[arch], str(library.resolve())], cwd=folder,
                       check=True, capture_output=True)
        result = subprocess.run([*command, str(Path(folder) / carried[arch])], capture_output=True,
                                text=True, check=True)
    return result.stdout


def disassemble(library: Path, arch: str, lines: bool = True) -> str:
    """``library``'s cubin for ``arch``, disassembled (with its inlined source lines: ``lines``)."""
    return read_cubin(library, arch, [binary("nvdisasm"), *(["-gi"] if lines else []), "-c"])


def parse_sass(text: str) -> list[SassInstruction]:
    """nvdisasm -gi's instructions; a predicate of @!PT (never runs: padding) leaves one out."""
    names = kernel_names(found.group(1) for line in text.splitlines() if (found := FUNCTION.match(line)))
    targets = set(LABEL_USE.findall(text))  # nvdisasm labels some addresses nothing branches to
    instructions, function, chain, after_instruction, block = [], "", [], False, 0
    for line in text.splitlines():
        if found := FUNCTION.match(line):
            function, chain = names[found.group(1)], []
        elif found := LABEL.match(line):
            block += found.group(1) in targets
        elif found := LINE_INFO.search(line):
            if after_instruction:  # a new instruction's chain, innermost line first
                chain, after_instruction = [], False
            chain.append((Path(found.group(1)).name, int(found.group(2))))
        elif (found := INSTRUCTION.search(line)) and function:
            after_instruction = True
            _, predicate, opcode, operands = found.groups()
            if predicate != "@!PT":
                instructions.append(SassInstruction(function, opcode, tuple(chain), shared_operand(opcode, operands),
                                                    predicate or "", block, destination(opcode, operands)))
            if opcode.split(".")[0] in BLOCK_ENDS:
                block += 1
    return instructions


def shared_operand(opcode: str, operands: str) -> tuple[str, int] | None:
    """An LDS's address operand as (its registers, offset); None for other opcodes (an ldmatrix's
    lanes give addresses of their own, so it is left out)."""
    if opcode.split(".")[0] != "LDS":
        return None
    found = SHARED_ADDRESS.search(operands)
    return (found.group(1) or "RZ", int(found.group(2) or "0", 16)) if found else None


def destination(opcode: str, operands: str) -> frozenset[str]:
    """The registers an instruction writes: its first operand's, as wide as its opcode says."""
    base, *suffixes = opcode.split(".")
    found = (SHUFFLE_DESTINATION if base == "SHFL" else DESTINATION).match(operands)
    if not found:
        return frozenset()
    if base == "HMMA":  # an m16n8 tile's accumulators: 4 fp32 registers (.F32, .F32.BF16), or 2 of fp16 pairs
        width = 4 if "F32" in suffixes else 2
    elif base == "CS2R":  # a pair, unless .32
        width = 1 if "32" in suffixes else 2
    elif base == "LDSM":  # .x1, .x2, .x4: a register a matrix
        width = int(suffixes[-1]) if suffixes[-1].isdigit() else 4
    else:
        width = next((DESTINATION_WIDTHS[s] for s in suffixes if s in DESTINATION_WIDTHS), 1)
    kind, first = found.group(1), int(found.group(2))
    return frozenset(f"{kind}{first + n}" for n in range(width))


def rereads(sass: list[SassInstruction]) -> set[int]:
    """The shared loads (indices into ``sass``) that read bytes a wider load reads: of the same
    kernel, source line and inlining chain, in the same basic block, the wider one under no
    predicate, at the same registers (none written by the first of the two or between them) and an
    offset inside its bytes.
    That is ptxas loading a value again where it did not keep it in a register, not an access
    split; each is a request more than the emulation counts."""
    blocks: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index, instruction in enumerate(sass):
        if instruction.shared_operand:
            blocks[(instruction.function, instruction.block)].append(index)
    return {narrow for loads in blocks.values() for narrow in loads
            if any(covers(sass[wide], sass[narrow]) and not written_between(sass, wide, narrow) for wide in loads)}


def covers(wide: SassInstruction, narrow: SassInstruction) -> bool:
    """Whether ``wide`` reads every byte ``narrow`` does, wider, from the same statement."""
    (registers, start), (same, offset) = wide.shared_operand, narrow.shared_operand
    width, size = accesses(wide.opcode)[0].bytes, accesses(narrow.opcode)[0].bytes
    return (registers == same and wide.chain == narrow.chain and not wide.predicate
            and width > size and start <= offset and offset + size <= start + width)


def written_between(sass: list[SassInstruction], one: int, other: int) -> bool:
    """Whether the first of the two loads, or an instruction between them, writes a register of
    their address (after which the second reads elsewhere)."""
    registers = set(re.findall(r"U?R\d+", sass[one].shared_operand[0]))
    return any(sass[i].writes & registers for i in range(min(one, other), max(one, other)))


def kernel_names(functions) -> dict[str, str]:
    """Each of nvdisasm's function names as memory_counts names kernels ("highResolutionMma<__half,
    64, 2>"): c++filt demangles the mangled ones."""
    functions = sorted(set(functions))
    mangled = [name for name in functions if name.startswith("_Z")]
    demangled = dict(zip(mangled, demangle(mangled))) if mangled else {}  # no c++filt needed otherwise
    return {name: memory_counts.kernel_name(name) for name in functions} | demangled


def demangle(names: list[str]) -> list[str]:
    result = subprocess.run([binary("c++filt")], input="\n".join(names), capture_output=True, text=True,
                            check=True)
    return [memory_counts.kernel_name(name) for name in result.stdout.splitlines()]


def statement_starts(lines: list[str]) -> dict[int, int]:
    """Each line's place: the first line of its statement (the compilers attribute a statement's
    accesses to different lines of it), or of its emulation branch (``#ifdef
    MRA_CUDA_EMULATION_H`` to its ``#endif``, whose two sides the two builds compile)."""
    places: dict[int, int] = {}
    statement, branch, depth, ended = 1, 0, 0, True
    for number, text in enumerate(lines, 1):
        code = text.split("//")[0].strip()
        if not branch and code.startswith(EMULATION_BRANCH):
            branch = number
        if branch:
            places[number] = branch
            depth += code.startswith("#if") - code.startswith("#endif")
            branch, ended = (branch if depth else 0), True
            continue
        if ended:
            statement = number
        places[number] = statement
        if code:
            ended = code.endswith((";", "{", "}", ":")) or code.startswith("#")
    return places


class Sources:
    """The kernels' source files, each line named by its place."""

    def __init__(self, folder: Path = SOURCE_FOLDER):
        self.lines = {path.name: path.read_text().splitlines() for path in sorted(folder.iterdir())
                      if path.suffix in (".cu", ".h", ".cuh")}
        self.starts = {name: statement_starts(lines) for name, lines in self.lines.items()}

    def place(self, chain) -> str:
        """The innermost of ``chain``'s (file, line) pairs, innermost first, in the kernels' source,
        as "file:line" of its place; "" where the chain never enters it."""
        for file, line in chain:
            if file in self.starts:
                if line not in self.starts[file]:
                    raise UserError(f"line {line} of {file} is past its end: the build is of other "
                                    "sources; rebuild it with make plugins")
                return f"{file}:{self.starts[file][line]}"
        return ""

    def text(self, place: str) -> str:
        file, line = place.split(":")
        return self.lines[file][int(line) - 1].strip()


def emulated_chain(instruction: memory_counts.Instruction) -> tuple[tuple[str, int], ...]:
    """An emulated instruction's addr2line chain ("file:line", outermost first), innermost first."""
    pairs = (where.rsplit(":", 1) for where in reversed(instruction.chain))
    return tuple((file, int(line)) for file, line in pairs if line.isdigit())


ELEMENT_TYPES = ("float", "__half", "__nv_bfloat16")


def element_type(function: str) -> str:
    """The data type a kernel (or the emulation's out-of-line helper) works on, which sets the
    widths of a statement shared by several instantiations: its first template argument where
    that is a type, float for the fp32 kernel, "" where it has none."""
    first = function.partition("<")[2].split(",")[0].rstrip(">").strip()
    return first if first in ELEMENT_TYPES else "float" if function.startswith("highResolutionFma") else ""


@dataclass
class Row:
    place: str
    element: str  # element_type of the kernels that run it
    space: str
    store: bool
    nvcc: set[int]
    emulation: set[int]
    through: str = ""  # the file nvcc's innermost line is in, where not the kernels' source
    rereads: int = 0  # nvcc's loads of bytes a wider load of the statement read (rereads())

    @property
    def verdict(self) -> str:
        """Narrower where nvcc lacks the widest access the emulation counts or makes one narrower
        than any counted (it split one); wider where it merged counted accesses. A re-read is
        neither: it is named beside the widths' verdict."""
        if self.rereads:
            return f"{self.widths_verdict}, nvcc reads {self.rereads} again"
        return self.widths_verdict

    @property
    def widths_verdict(self) -> str:
        if self.nvcc == self.emulation:
            return "same"
        if not self.emulation:
            return f"nvcc only (through {self.through})" if self.through else "nvcc only"
        if not self.nvcc:
            return "emulation only"
        if min(self.nvcc) < min(self.emulation) or max(self.nvcc) < max(self.emulation):
            return "narrower in nvcc"
        return "wider in nvcc"


def compare(sass: list[SassInstruction], emulated: list[memory_counts.Instruction],
            sources: Sources) -> tuple[list[Row], list[str]]:
    """The rows of the kernels the emulation ran, by place, space and direction; and the kernels
    nvcc compiled that the problems did not run."""
    ran = {i.function for i in emulated}
    rows: dict[tuple[str, str, str, bool], Row] = {}

    def row(place, function, space, store):
        key = (place, element_type(function), space, store)
        return rows.setdefault(key, Row(*key, set(), set()))

    again = rereads(sass)
    for index, instruction in enumerate(sass):
        place = sources.place(instruction.chain)
        for access in accesses(instruction.opcode):
            if instruction.function in ran and place and access.space not in UNMODELLED_SPACES:
                entry = row(place, instruction.function, access.space, access.store)
                if index in again:
                    entry.rereads += 1
                else:
                    entry.nvcc.add(access.bytes)
                if instruction.chain[0][0] not in sources.starts:
                    entry.through = instruction.chain[0][0]
    for instruction in emulated:
        place = sources.place(emulated_chain(instruction))
        if place:
            row(place, instruction.function, instruction.space, instruction.store).emulation.add(instruction.bytes)
    spread_untyped_helpers(rows)
    not_run = sorted({i.function for i in sass} - ran)
    return sorted(rows.values(), key=lambda r: (r.place.split(":")[0], int(r.place.split(":")[1]),
                                                r.element, r.space, r.store)), not_run


def spread_untyped_helpers(rows: dict) -> None:
    """An access the emulation counts in a helper GCC kept out of line with no type of its own
    (realTokenBits) is nvcc's in every kernel it is inlined into: its widths join the typed rows
    nvcc has at that place, in place of a row of its own."""
    for key, row in list(rows.items()):
        place, element, space, store = key
        typed = [other for (p, e, sp, st), other in rows.items()
                 if (p, sp, st) == (place, space, store) and e and other.nvcc]
        if not element and not row.nvcc and typed:
            for other in typed:
                other.emulation |= row.emulation
            del rows[key]


def unmodelled(sass: list[SassInstruction], sources: Sources) -> dict[str, dict[str, set[str]]]:
    """Each kernel's local-memory and generic accesses: space -> their places."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for instruction in sass:
        for access in accesses(instruction.opcode):
            if access.space in UNMODELLED_SPACES:
                found[instruction.function][access.space].add(sources.place(instruction.chain) or "?")
    return found


def report(arch: str, rows: list[Row], not_run: list[str], odd: dict, sources: Sources,
           every_row: bool = False) -> str:
    verdicts = defaultdict(int)
    for r in rows:
        verdicts[r.widths_verdict.split(" (")[0]] += 1
    reread = [r for r in rows if r.rereads]
    out = [f"## {arch}: each statement's access widths, nvcc's beside the emulation's", "",
           f"{len(rows)} statement accesses (place, data type, space, direction): "
           + ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items())) + "; "
           + f"{len(reread)} of them read again by nvcc ({sum(r.rereads for r in reread)} load instructions "
           "over the kernels).",
           "Kernels nvcc compiled that the problems do not run: "
           + (", ".join(f"`{name}`" for name in not_run) or "none") + ".", "",
           "| place | statement | data | space | access | nvcc bytes | emulation bytes | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if every_row or r.verdict != "same":
            code = sources.text(r.place).replace("|", "\\|")
            code = code if len(code) <= 60 else code[:57] + "..."
            out.append(f"| {r.place} | `{code}` | {r.element or '-'} | {r.space} | {'store' if r.store else 'load'} "
                       f"| {widths(r.nvcc)} | {widths(r.emulation)} | {r.verdict} |")
    out += ["", f"## {arch}: accesses the counts do not model", ""]
    if not odd:
        out.append("None: no kernel reads or writes local memory, and none uses a generic address.")
    else:
        out += ["| kernel | space | places |", "|---|---|---|"]
        for function, spaces in sorted(odd.items()):
            for space, places in sorted(spaces.items()):
                out.append(f"| {function} | {space} | {', '.join(sorted(places))} |")
    return "\n".join(out)


def widths(sizes: set[int]) -> str:
    return ", ".join(map(str, sorted(sizes))) or "-"


def architecture(text: str) -> str:
    """An --arch argument, "sm_90" (argparse's one-line error otherwise)."""
    if not re.fullmatch(r"sm_\d+[a-z]?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an architecture such as sm_90")
    return text


def parse_report_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``parser``'s arguments with --arch (sm_90) and --out, checked (a one-line usage error)."""
    parser.add_argument("--arch", type=architecture, default="sm_90", help="the kernels of this architecture (sm_90)")
    parser.add_argument("--out", type=memory_counts.report_path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every statement, the same ones too")
    args = parse_report_arguments(parser, argv)

    def comparison() -> str:
        sources = Sources()
        sass = parse_sass(disassemble(native.library_path(native.CUDA_LIBRARY), args.arch))
        rows, not_run = compare(sass, memory_counts.run("attention"), sources)
        return report(args.arch, rows, not_run, unmodelled(sass, sources), sources, args.all)

    return memory_counts.write_report(comparison, args.out)


if __name__ == "__main__":
    sys.exit(main())
