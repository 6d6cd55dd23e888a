"""The instructions a warp of each high-resolution kernel issues for one key block, as nvcc
compiled them (tools/instruction_counts.py). The first tests walk small pieces of
nvdisasm's output (with names that need no demangling) and need no CUDA; the others need the CUDA
library (make plugins with nvcc), NVIDIA's cuobjdump and nvdisasm (make setup) and c++filt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import built_or_skip, cuda_architectures_named, disassembly_tools_or_skip, load_tool

instruction_counts = load_tool("instruction_counts")

# nvdisasm -c's shape. A loop (0x10 to 0x90) whose head copies; a uniform branch skips two
# masking instructions (the every-key-real path); a branch around the matrix product (a path
# without it is not a key block's); a divergent fallback out of the loop; an instruction that
# never runs; then the epilogue and a padding loop after EXIT.
SASS = """\
.text.kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
        /*0030*/                   FMNMX R5, R5, R6, !PT ;
        /*0040*/                   FSEL R5, R5, -3.40282346638528859812e+38, P1 ;
.L_x_1:
        /*0050*/               @P2 BRA `(.L_x_2) ;
        /*0060*/                   HMMA.16816.F32 R8, R12, R14, R8 ;
.L_x_2:
        /*0070*/                   BRA.DIV UR4, `(.L_x_3) ;
        /*0080*/              @!PT SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*0090*/              @!P1 BRA `(.L_x_0) ;
        /*00a0*/                   FCHK P0, R7, R9 ;
        /*00b0*/                   STG.E desc[UR4][R2.64], R8 ;
        /*00c0*/                   EXIT ;
.L_x_3:
        /*00d0*/                   WARPSYNC.ALL ;
        /*00e0*/                   BRA `(.L_x_2) ;
.L_x_4:
        /*00f0*/                   BRA `(.L_x_4) ;
"""


def test_the_loops_paths_with_all_its_work_give_the_fewest_and_the_most_instructions():
    kernels = instruction_counts.parse(SASS)
    assert list(kernels) == ["kernel"]
    instructions = kernels["kernel"]
    assert [i.address for i in instructions][:3] == [0x0, 0x10, 0x20]
    assert instructions[2].target == 0x50 and instructions[2].conditional
    assert instructions[8].predicate == "@!PT"

    counted = instruction_counts.count("kernel", instructions)
    fewest, most = counted.key_block
    # 0x10 0x20 0x50 0x60 0x70 (0x80 never runs) 0x90; the masking path adds 0x30 and 0x40.
    assert (fewest.length, most.length) == (6, 8)
    assert (fewest.work, fewest.copies) == (most.work, most.copies) == (1, 1)
    assert (fewest.opcodes["FMNMX"], most.opcodes["FMNMX"], most.opcodes["FSEL"]) == (0, 1, 1)
    assert (fewest.opcodes["BRA"], fewest.opcodes["SHFL"]) == (4, 0)  # BRA.DIV is a BRA; 0x80 never runs
    assert counted.before == 1  # the MOV
    assert counted.after == 3  # FCHK, STG, EXIT
    assert counted.divisions == 1


def test_a_divergent_warps_fallback_jumping_back_is_not_the_loop():
    """A BRA.DIV's fallback code lies after EXIT and jumps back into the kernel: a converged warp
    never runs it, though its span may hold more matrix products than the loop's."""
    fallback = SASS.replace("        /*00d0*/                   WARPSYNC.ALL ;",
                            "        /*00d0*/                   HMMA.16816.F32 R8, R12, R14, R8 ;")
    fallback = fallback.replace("        /*00e0*/                   BRA `(.L_x_2) ;",
                                "        /*00e0*/                   BRA `(.L_x_0) ;")
    counted = instruction_counts.count("kernel", instruction_counts.parse(fallback)["kernel"])
    assert (counted.key_block[0].length, counted.key_block[1].length) == (6, 8)


def walk(sass: str) -> tuple[int, int]:
    fewest, most = instruction_counts.count("kernel", instruction_counts.parse(sass)["kernel"]).key_block
    return fewest.length, most.length


def test_a_second_backward_branch_to_the_head_ends_an_iteration_too():
    """A `continue`: an iteration may end at either branch back (0x80 taken: 6 instructions;
    the masks and 0x80 not taken, then 0x90: 9)."""
    continued = SASS.replace("        /*0080*/              @!PT SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;",
                             "        /*0080*/               @P4 BRA `(.L_x_0) ;")
    assert walk(continued) == (6, 9)


def test_a_branchs_own_condition_keeps_its_fall_through():
    """`BRA !P3, target` is as conditional as `@P3 BRA target`; a `@!PT BRA` back is no loop."""
    operand = SASS.replace("               @P0 BRA `(.L_x_1) ;", "                   BRA !P3, `(.L_x_1) ;")
    assert walk(operand) == (6, 8)
    never = SASS.replace("        /*0080*/              @!PT SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;",
                         "        /*0080*/              @!PT BRA `(.L_x_1) ;")
    assert walk(never) == (6, 8)


def test_of_loops_with_as_many_matrix_products_the_narrowest_is_the_key_blocks():
    """A loop from 0x00 to 0xb0 around the key-block loop holds its one HMMA too."""
    outer = SASS.replace("        /*00b0*/                   STG.E desc[UR4][R2.64], R8 ;",
                         "        /*00b0*/               @P5 BRA `(.L_x_5) ;").replace(
                         ".text.kernel:\n", ".text.kernel:\n.L_x_5:\n")
    assert walk(outer) == (6, 8)


def test_each_kernels_labels_are_its_own():
    """A second kernel that names its label .L_x_8 but branches to .L_x_1, the first kernel's."""
    two = SASS + SASS.replace(".text.kernel:", ".text.other:").replace(".L_x_1:\n", ".L_x_8:\n")
    with pytest.raises(instruction_counts.UserError, match="other branches to .L_x_1, which it does not hold"):
        instruction_counts.parse(two)


@pytest.mark.parametrize("change, message", [
    (("`(.L_x_1) ;", "`(.L_x_9) ;"), "kernel branches to .L_x_9, which it does not hold"),
    (("HMMA.16816.F32 R8, R12, R14, R8", "FFMA R8, R12, R14, R8"), "kernel has no loop of products"),
    (("                   MOV R1, c[0x0][0x28] ;", "                   BRA `(.L_x_1) ;"),  # entered mid-loop
     "kernel: no forward path to the loop's head"),
])
def test_sass_the_tool_cannot_walk_is_refused_in_one_line(change, message):
    with pytest.raises(instruction_counts.UserError, match=message):
        instruction_counts.count("kernel", instruction_counts.parse(SASS.replace(*change))["kernel"])


def test_a_branch_back_after_the_loop_ends_its_path():
    """After the key-block loop the walk follows no branch back either: the output loop below,
    left only at its head's conditional EXIT, counts as its way out (FCHK, EXIT), not as a pass
    that would reach that EXIT again from the back branch."""
    tail = """\
.text.kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   HMMA.16816.F32 R8, R12, R14, R8 ;
        /*0030*/              @!P1 BRA `(.L_x_0) ;
        /*0040*/                   FCHK P0, R7, R9 ;
.L_x_6:
        /*0050*/               @P6 EXIT ;
        /*0060*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0070*/                   STG.E desc[UR4][R2.64+0x10], R8 ;
        /*0080*/                   BRA `(.L_x_6) ;
        /*0090*/                   EXIT ;
"""
    counted = instruction_counts.count("kernel", instruction_counts.parse(tail)["kernel"])
    assert (counted.before, counted.after) == (1, 2)
    assert (counted.key_block[0].length, counted.key_block[1].length) == (3, 3)


def test_a_loop_holding_a_loop_is_refused_in_one_line():
    inner = SASS.replace("        /*0070*/                   BRA.DIV UR4, `(.L_x_3) ;",
                         "        /*0070*/               @P3 BRA `(.L_x_2) ;")
    with pytest.raises(instruction_counts.NestedLoop, match="holds another loop"):
        instruction_counts.count("kernel", instruction_counts.parse(inner)["kernel"])


def test_each_kernel_family_is_counted_by_its_products_and_only_fp32_may_hold_a_loop(monkeypatch):
    """counts() walks the fp32 kernels by their FFMA and the tensor-core ones by their HMMA; an
    fp32 kernel whose loop holds a loop is listed as not counted, a tensor-core one is refused."""
    fma = SASS.replace("HMMA.16816.F32 R8, R12, R14, R8", "FFMA R8, R12, R14, R8")
    nested = fma.replace("        /*0070*/                   BRA.DIV UR4, `(.L_x_3) ;",
                         "        /*0070*/               @P3 BRA `(.L_x_2) ;")
    library = {"highResolutionFma<64,1>": fma, "highResolutionFma<32,2>": nested,
               "highResolutionMma<__half,64,1>": SASS}

    def disassembled(*_, **__) -> str:
        return "\n".join(text.replace(".text.kernel:", f".text.{name}:") for name, text in library.items())

    monkeypatch.setattr(instruction_counts.sass_accesses, "disassemble", disassembled)
    rows, not_counted = instruction_counts.counts(Path("libmra_attention_cuda.so"), "sm_90")
    assert [row.kernel for row in rows] == ["highResolutionFma<64,1>", "highResolutionMma<__half,64,1>"]
    assert [row.key_block[0].work for row in rows] == [1, 1]
    assert not_counted == ["highResolutionFma<32,2>"]
    assert instruction_counts.report("sm_90", rows, not_counted).endswith(
        "Not counted (a loop in the key-block loop, which nvcc did not unroll): highResolutionFma<32,2>.")
    library["highResolutionMma<__half,64,1>"] = nested.replace("FFMA", "HMMA.16816.F32")
    with pytest.raises(instruction_counts.NestedLoop, match="highResolutionMma<__half,64,1>'s key-block loop"):
        instruction_counts.counts(Path("libmra_attention_cuda.so"), "sm_90")


@pytest.fixture(scope="module")
def built_counts() -> dict:
    """The built library's counts, by architecture (skips where it was built without nvcc, or
    where cuobjdump, nvdisasm or c++filt is missing; the tool's own refusals fail)."""
    from mra_export import native

    library = built_or_skip(native.CUDA_LIBRARY)
    sass_accesses = instruction_counts.sass_accesses
    disassembly_tools_or_skip(sass_accesses)
    return {arch: instruction_counts.counts(library, arch) for arch in sass_accesses.architectures(library)}


def head_dim(kernel: str) -> int:
    return int(re.match(r"highResolution\wma<(?:\w+, )?(\d+), \d>", kernel).group(1))


def tensor_core_rows(rows) -> list:
    return [row for row in rows if row.kernel.startswith("highResolutionMma<")]


def fp32_rows(rows) -> dict:
    return {row.kernel: row for row in rows if row.kernel.startswith("highResolutionFma<")}


def test_every_tensor_core_kernel_issues_its_key_blocks_matrix_products(built_counts):
    """S = Q K^T is D/16 k steps over 4 key tiles of 8; O += P V is 2 key steps over D/8 dim
    tiles; and the rows' normalisers, P times a tile of ones, 2 key steps: D/2 + 2 mma.sync a
    warp a key block, on the loop's fullest paths, with the next block's copies."""
    assert sorted(built_counts) == cuda_architectures_named()
    for arch, (rows, _) in built_counts.items():
        rows = tensor_core_rows(rows)
        assert len(rows) == 12, arch  # fp16, bf16; head_dim 32, 64, 128; split or not
        for row in rows:
            fewest, _ = row.key_block
            assert fewest.work == head_dim(row.kernel) // 2 + 2, (arch, row.kernel)
            assert fewest.copies > 0, (arch, row.kernel)


def test_the_fp32_kernels_key_block_loops_are_unrolled_whole_from_head_dim_64(built_counts):
    """A thread of highResolutionFma takes 2 query rows against 4 keys (8 D multiply-adds for the
    scores) and 32 keys into its 2 rows' D / 4 output dims (8 D for P V): 16 D FFMA a key block,
    and the softmax's few besides. From head_dim 64 the loops over dims and keys are unrolled
    whole (scoresByFma, highResolutionFma), so the key-block loop holds no loop and is counted;
    rolled up, it is not (or holds a fraction of the FFMA)."""
    for arch, (rows, nested) in built_counts.items():
        fp32 = fp32_rows(rows)
        assert {"highResolutionFma<64, 1>", "highResolutionFma<64, 2>", "highResolutionFma<128, 1>"} <= set(fp32), \
            (arch, sorted(fp32), nested)
        for kernel, row in fp32.items():
            fewest, _ = row.key_block
            products = 16 * head_dim(kernel)
            assert products <= fewest.work <= products + 128, (arch, kernel, fewest)
            assert fewest.copies > 0, (arch, kernel)


def test_the_fp32_scores_multiply_where_sqrt_head_dim_is_a_power_of_two(built_counts):
    """scoresByFma divides each of a thread's 8 scores by sqrt(head_dim), as PyTorch does, except
    at head_dim 64 (16, 256), where it multiplies by the exact reciprocal (the same bits): its
    kernels keep 8 fewer divisions (FCHK) than head_dim 128's. At head_dim 32 a reciprocal would
    change the bits: it divides, as 128 does."""
    for arch, (rows, _) in built_counts.items():
        divisions = {kernel: row.divisions for kernel, row in fp32_rows(rows).items()}
        assert divisions["highResolutionFma<64, 1>"] == divisions["highResolutionFma<64, 2>"] \
            == divisions["highResolutionFma<128, 1>"] - 8, (arch, divisions)
        assert divisions["highResolutionFma<32, 1>"] >= divisions["highResolutionFma<128, 1>"], (arch, divisions)


def test_a_block_without_padding_keys_takes_the_shorter_path(built_counts):
    """byKeyPadding compiles the softmax twice: a block whose keys are all real skips the masks'
    selects and one of the two row reductions. (The longest path also rescales the output,
    whose multiplies are left out of the difference.)"""
    for arch, (rows, _) in built_counts.items():
        for row in tensor_core_rows(rows):
            fewest, most = row.key_block
            rescale = most.opcodes["FMUL"] - fewest.opcodes["FMUL"]
            assert most.length - fewest.length - rescale >= 100, (arch, row.kernel, fewest, most)


def test_a_key_block_whose_rows_keep_their_softmax_bases_leaves_the_output_unscaled(built_counts):
    """The 16-bit kernels' bases are lazy (SoftmaxArithmetic::kTensorCore, MRA_LAZY_SOFTMAX_BASE):
    where no row of a warp moved its own, the warp skips multiplying its D/2 output registers a
    thread by the rescale: the fewest path has at least D/2 FMUL fewer than the most, which
    rescales (at head_dim 64, 20 and 56; before, 52 on both). And the normalisers are P V's
    products, not sums of the thread's own: the fewest path's only shuffles are the two rows'
    maxima, 2 each (before, 4 more for the sums)."""
    for arch, (rows, _) in built_counts.items():
        for row in tensor_core_rows(rows):
            fewest, most = row.key_block
            assert most.opcodes["FMUL"] - fewest.opcodes["FMUL"] >= head_dim(row.kernel) // 2, \
                (arch, row.kernel, fewest.opcodes, most.opcodes)
            assert fewest.opcodes["SHFL"] <= 4, (arch, row.kernel, fewest.opcodes)


def test_the_epilogue_divides_once_a_row_not_once_a_dim(built_counts):
    """RowEpilogue multiplies each dim by its row's reciprocal (1 / y: no FCHK), so a kernel's
    x / y divisions do not grow with head_dim: they were 34, 66 and 130 at head_dim 32, 64 and
    128. The 2 left are quantisedRowMax's, one a row of the thread's two."""
    for arch, (rows, _) in built_counts.items():
        rows = tensor_core_rows(rows)
        assert {row.divisions for row in rows} == {2}, (arch, [(row.kernel, row.divisions) for row in rows])
