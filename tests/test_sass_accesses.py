"""The kernels' memory instructions as nvcc compiled them (the built CUDA library's SASS, read by
NVIDIA's cuobjdump and nvdisasm from PyPI) against the ones the emulation's memory counts count
(tools/sass_accesses.py): where each source statement loads and stores the same widths in both,
tests/test_cuda_memory_counts.py's bank conflicts and sectors are the GPU's instructions'. The
first tests read a small piece of nvdisasm's output and need no CUDA; the others need the
library (make plugins with nvcc) and the two binaries (make setup installs them)."""

from __future__ import annotations

import pytest

from .conftest import built_or_skip, cuda_architectures_named, disassembly_tools_or_skip, load_tool, program_or_skip

sass_accesses = load_tool("sass_accesses")
memory_counts = sass_accesses.memory_counts

# nvdisasm -gi's shape: a function, then instructions each after its chain of source lines.
SASS = """\
\t.section\t.text._ZN3mra55_GLOBAL__N__7ef92589_22_mraAttentionKernels_cu_c05087c519lowResolutionLogitsENS_7ProblemENS_7ScratchE,"ax",@progbits
.text._ZN3mra55_GLOBAL__N__7ef92589_22_mraAttentionKernels_cu_c05087c519lowResolutionLogitsENS_7ProblemENS_7ScratchE:
\t//## File "/x/plugins/mra_attention/mraAttentionKernels.cu", line 1339 inlined at "/x/plugins/mra_attention/mraAttentionKernels.cu", line 1427
\t//## File "/x/plugins/mra_attention/mraAttentionKernels.cu", line 1427
        /*3e50*/                   LDSM.16.M88.4 R4, [R40] ;
        /*3e60*/                   LDS.128 R8, [R40+0x20] ;
\t//## File "/x/include/cub/block/specializations/block_scan_raking.cuh", line 200 inlined at "/x/plugins/mra_attention/mraAttentionKernels.cu", line 580
\t//## File "/x/plugins/mra_attention/mraAttentionKernels.cu", line 580
        /*0b00*/              @!PT LDS RZ, [RZ] ;
        /*0b30*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R6.64], P0 ;
        /*0b40*/               @P1 STG.E.U16 desc[UR4][R2.64], R5 ;
"""


def test_nvdisasms_instructions_are_read_with_their_kernel_and_source_chain():
    instructions = sass_accesses.parse_sass(SASS)
    assert [i.opcode for i in instructions] == ["LDSM.16.M88.4", "LDS.128", "LDGSTS.E.BYPASS.128",
                                                "STG.E.U16"]  # the @!PT padding left out
    assert {i.function for i in instructions} == {"lowResolutionLogits"}
    assert instructions[0].chain == (("mraAttentionKernels.cu", 1339), ("mraAttentionKernels.cu", 1427))
    assert instructions[2].chain[0] == ("block_scan_raking.cuh", 200)
    assert instructions[2].chain == instructions[3].chain


@pytest.mark.parametrize("opcode, expected", [
    ("LDS", [("shared", False, 4)]), ("LDS.U16", [("shared", False, 2)]),
    ("STS.64", [("shared", True, 8)]), ("LDSM.16.MT88.4", [("shared", False, 16)]),
    ("ATOMS.ADD", [("shared", True, 4)]), ("LDG.E.128.CONSTANT", [("global", False, 16)]),
    ("RED.E.ADD.F32.FTZ.RN.STRONG.GPU", [("global", True, 4)]),
    ("LDGSTS.E.BYPASS.128", [("global", False, 16), ("shared", True, 16)]),
    ("LDL.64", [("local", False, 8)]), ("LD.E", [("generic", False, 4)]),
    ("LDGDEPBAR", []), ("HMMA.16816.F32", []), ("LDC.64", []),
])
def test_each_opcodes_accesses(opcode, expected):
    assert [(a.space, a.store, a.bytes) for a in sass_accesses.accesses(opcode)] == expected


@pytest.mark.parametrize("nvcc, emulation, verdict", [
    ({16}, {16}, "same"), ({16}, {4}, "wider in nvcc"), ({16}, {4, 16}, "wider in nvcc"),
    ({4, 16}, {16}, "narrower in nvcc"), ({4}, {4, 16}, "narrower in nvcc"), ({4, 16}, {8}, "narrower in nvcc"),
    (set(), {4}, "emulation only"), ({4}, set(), "nvcc only"),
])
def test_a_row_is_narrower_wherever_nvcc_split_an_access_the_counts_take_whole(nvcc, emulation, verdict):
    assert sass_accesses.Row("k.cu:1", "", "shared", False, nvcc, emulation).verdict == verdict


# Line 20: ptxas loading a word of a 16-byte load before it and after it (values it did not keep
# in registers; a label nothing branches to between), a word past it, one from another register,
# one after the register changed, one past a label a branch goes to, one after a load that
# overwrote its own address register, one the wider load's predicate may skip, one of another
# statement (line 30). Line 30 also splits a 16-byte access into 8-byte loads.
REREAD = """\
.text.k:
\t//## File "/x/plugins/mra_attention/mraAttentionKernels.cu", line 20
        /*0000*/                   LDS R3, [R61+0x2aa4] ;
        /*0010*/                   LDS.128 R4, [R61+0x2aa0] ;
.L_x_9:
        /*0020*/                   LDS R9, [R61+0x2aac] ;
        /*0030*/                   LDS R10, [R61+0x2ab0] ;
        /*0040*/                   LDS R11, [R62+0x2aa4] ;
        /*0050*/                   IADD3 R61, R61, 0x10, RZ ;
        /*0060*/                   LDS R12, [R61+0x2aa8] ;
        /*0070*/                   LDS.128 R20, [R61+0x2ac0] ;
.L_x_1:
        /*0080*/                   LDS R13, [R61+0x2ac4] ;
        /*0090*/                   LDS.128 R60, [R61+0x10] ;
        /*00a0*/                   LDS R9, [R61+0x14] ;
        /*00b0*/               @P0 LDS.128 R24, [R70] ;
        /*00c0*/               @P0 LDS R28, [R70+0x4] ;
        /*00d0*/                   LDS.128 R40, [R80] ;
\t//## File "/x/plugins/mra_attention/mraAttentionKernels.cu", line 30
        /*00e0*/                   LDS R44, [R80+0x4] ;
        /*00f0*/                   LDS.64 R14, [R90] ;
        /*0100*/                   LDS.64 R16, [R90+0x8] ;
        /*0110*/                   BRA `(.L_x_1) ;
"""


def test_a_load_of_bytes_a_wider_load_of_its_statement_read_is_a_reread_not_a_split():
    sass = sass_accesses.parse_sass(REREAD)
    assert [i.shared_operand for i in sass if i.opcode.startswith("LDS")] == [
        ("R61", 0x2aa4), ("R61", 0x2aa0), ("R61", 0x2aac), ("R61", 0x2ab0), ("R62", 0x2aa4), ("R61", 0x2aa8),
        ("R61", 0x2ac0), ("R61", 0x2ac4), ("R61", 0x10), ("R61", 0x14), ("R70", 0), ("R70", 4), ("R80", 0),
        ("R80", 4), ("R90", 0), ("R90", 8)]
    assert sass[5].writes == {"R61"} and sass[1].writes == {"R4", "R5", "R6", "R7"}
    assert sass_accesses.rereads(sass) == {0, 2}


@pytest.mark.parametrize("opcode, operands, written", [
    ("LDS.U.128", " R4, [R61]", {"R4", "R5", "R6", "R7"}), ("IMAD.WIDE.U32", " R2, R3, 0x4, R4", {"R2", "R3"}),
    ("HMMA.16816.F32.BF16", " R8, R12, R14, R8", {"R8", "R9", "R10", "R11"}),
    ("HMMA.16816.F16", " R8, R12, R14, R8", {"R8", "R9"}), ("LDSM.16.MT88.2", " R4, [R40]", {"R4", "R5"}),
    ("CS2R", " R86, SRZ", {"R86", "R87"}), ("CS2R.32", " R86, SR_CLOCKLO", {"R86"}),
    ("SHFL.BFLY", " PT, R125, R109, 0x1, 0x1f", {"R125"}), ("S2UR", " UR4, SR_CTAID.X", {"UR4"}),
    ("ISETP.GE.AND", " P0, PT, R2, R3, PT", set()), ("STS.128", " [R2+0x10], R4", set()),
])
def test_each_instructions_written_registers(opcode, operands, written):
    assert sass_accesses.destination(opcode, operands) == written


def test_a_statements_rereads_are_counted_apart_from_its_widths():
    sass = sass_accesses.parse_sass("\n".join(REREAD.splitlines()[:6]))  # through the first re-read
    assert [i.opcode for i in sass] == ["LDS", "LDS.128", "LDS"]
    emulated = [memory_counts.Instruction("shared", 0, False, 16, 1, 1, 1, 1, "k", ("mraAttentionKernels.cu:20",))]
    rows, not_run = sass_accesses.compare(sass, emulated, sass_accesses.Sources())
    assert not_run == []
    [row] = rows
    assert (row.nvcc, row.emulation, row.rereads) == ({16}, {16}, 2)
    assert row.verdict == "same, nvcc reads 2 again"


def test_a_kernels_data_type_keys_its_widths():
    assert [sass_accesses.element_type(name) for name in (
        "highResolutionMma<__half, 64, 2>", "copyTiles<float, 32, 2, 128>", "highResolutionFma<32, 1>",
        "blockMeans<__nv_bfloat16>", "selectBlocks", "scoresByFma<64>")] == [
        "__half", "float", "float", "__nv_bfloat16", "", ""]


def test_a_statements_lines_and_an_emulation_branch_each_count_as_one_place():
    source = ["void f(float* out, float const* in)",  # 1
              "{",  # 2
              "    *reinterpret_cast<uint4*>(out)",  # 3: a statement over two lines
              "        = *reinterpret_cast<uint4 const*>(in); // a comment",  # 4
              "#ifdef MRA_CUDA_EMULATION_H",  # 5
              "    ::emu::call(out);",  # 6
              "#else",  # 7
              "#if __CUDA_ARCH__ >= 800",  # 8
              "    asm volatile(\"...\");",  # 9
              "#endif",  # 10
              "#endif",  # 11
              "    out[1] = in[1];",  # 12
              "}"]
    places = sass_accesses.statement_starts(source)
    assert places[3] == places[4] == 3
    assert {places[n] for n in range(5, 12)} == {5}
    assert places[12] == 12


@pytest.fixture(scope="module")
def built_sass() -> dict:
    """The built library's kernels, by architecture (skips where it was built without nvcc, or
    where cuobjdump, nvdisasm or c++filt is missing; the tool's own refusals fail)."""
    from mra_export import native

    library = built_or_skip(native.CUDA_LIBRARY)
    disassembly_tools_or_skip(sass_accesses)
    return {arch: sass_accesses.parse_sass(sass_accesses.disassemble(library, arch))
            for arch in sass_accesses.architectures(library)}


@pytest.fixture(scope="module")
def comparisons(built_sass) -> dict:
    """Each architecture's rows and the kernels the problems did not run."""
    program_or_skip(memory_counts.PROGRAM, "MRA_HAVE_ACCESS_HOOKS", "-fsanitize=kernel-address hooks")
    emulated, sources = memory_counts.run("attention"), sass_accesses.Sources()
    return {arch: sass_accesses.compare(sass, emulated, sources) for arch, sass in built_sass.items()}


def described(rows) -> str:
    return "\n".join(f"{r.place} {r.element or '-'} {r.space} {'store' if r.store else 'load'}: "
                     f"nvcc {sorted(r.nvcc)}, emulation {sorted(r.emulation)}" for r in rows)


def test_every_architecture_the_build_names_is_compared(comparisons):
    assert sorted(comparisons) == cuda_architectures_named()


def test_the_problems_run_every_kernel_and_memory_statement_nvcc_compiled(comparisons):
    for arch, (rows, not_run) in comparisons.items():
        assert not_run == [], arch
        assert len(rows) >= 60, arch
        # What nvcc alone has is CUB's scan, which the emulation replaces with a stand-in.
        alone = [r for r in rows if not r.emulation and r.through != "block_scan_raking.cuh"]
        assert not alone, f"{arch}:\n{described(alone)}"
        assert any(r.through for r in rows), arch


def test_every_global_statement_has_nvccs_widths(comparisons):
    """So the sectors the counts give each global statement are those of nvcc's instructions."""
    for arch, (rows, _) in comparisons.items():
        counted = [r for r in rows if r.space == "global" and r.emulation]
        assert len(counted) >= 15, arch
        differing = [r for r in counted if r.nvcc != r.emulation]
        assert not differing, f"{arch}:\n{described(differing)}"


def test_the_tensor_core_kernels_statements_all_have_nvccs_widths(comparisons, built_sass):
    """The 16-bit kernels (the engines' precision): every shared and global statement the same
    widths in both, so their wavefronts and sectors are those of nvcc's instructions."""
    sources = sass_accesses.Sources()
    for arch, (rows, _) in comparisons.items():
        places = {sources.place(i.chain) for i in built_sass[arch]
                  if i.function.startswith("highResolutionMma<") and sass_accesses.accesses(i.opcode)}
        checked = [r for r in rows if r.place in places and r.element in ("__half", "__nv_bfloat16")]
        assert len(checked) >= 15, arch
        differing = [r for r in checked if r.verdict != "same"]
        assert not differing, f"{arch}:\n{described(differing)}"


def test_nvcc_splits_no_access_the_emulation_counts_whole(comparisons):
    """nvcc may merge neighbouring accesses (a loop's floats into one 16-byte load: fewer
    requests than counted); one it split would make more than the counts say."""
    for arch, (rows, _) in comparisons.items():
        narrower = [r for r in rows if r.widths_verdict == "narrower in nvcc"]
        assert not narrower, f"{arch}:\n{described(narrower)}"


def test_no_kernel_uses_local_memory(built_sass):
    """Local memory (a spill, or an array indexed at run time) is off-chip traffic that neither
    ptxas's spill warning (arrays) nor the counts see; generic addresses only where PTX has no
    other: the selection's reads of its cluster's shared memory (map_shared_rank)."""
    sources = sass_accesses.Sources()
    for arch, sass in built_sass.items():
        found = sass_accesses.unmodelled(sass, sources)
        assert not any("local" in spaces for spaces in found.values()), (arch, dict(found))
        generic = {function for function, spaces in found.items() if "generic" in spaces}
        assert generic <= {"selectBlocks"}, (arch, generic)
