"""racecheck's stand-in without a GPU: the CUDA kernels' source under the CUDA emulation, built
with ThreadSanitizer (plugins/tests/cuda_emulation/racecheckDriver.cpp).

Each CUDA thread is a ThreadSanitizer fiber, and only what orders memory on a GPU
(``__syncthreads``, ``__syncwarp``, ``cluster.sync``, the end of a cluster before the next) orders
it there; a CTA's exit writes its shared memory, which the SM's next CTA may take. Two threads'
accesses to the same memory, one a write, with none of those between are a data race whatever the
schedule; tests/test_cuda_emulation.py catches one only where a schedule changes a number.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from .conftest import program_or_skip

PROGRAM = "mra_emulation_racecheck"

# racecheckDriver.cpp's small kernels, and whether each has a race.
SMALL_KERNELS = {
    "nothing-between": True,  # a thread reads the cell another wrote, nothing between
    "syncthreads-between": False,
    "syncwarp-within-a-warp": False,
    "syncwarp-across-warps": True,  # __syncwarp orders a warp's lanes, not two warps
    "shuffle-between": True,  # a shuffle exchanges registers; it orders no memory
    "copy-read-after-its-wait": False,  # a cp.async read after its wait_group and a barrier
    "copy-read-before-its-wait": True,  # ... after a barrier before its wait_group
    # In a cluster of 2, CTA 1 reads CTA 0's shared memory through map_shared_rank:
    "cluster-sync-between-ctas": False,  # after a cluster.sync, and one more before exiting
    "syncthreads-between-ctas": True,  # __syncthreads orders a CTA's threads, not the cluster's
    "exit-before-another-ctas-read": True,  # no cluster.sync between the read and CTA 0's exit
    # In a programmatic dependent launch, thread 0 stores before its griddepcontrol.wait and
    # thread 1 reads after its own: a race the emulation's schedules never expose.
    "store-before-wait-barrier-after": False,  # a __syncthreads after the waits
    "store-before-wait-read-after-wait": True,  # the wait orders a thread after the kernel before only
}


def racecheck_program():
    """The driver, built by CMake where the compiler has -fsanitize=thread (skips otherwise)."""
    return program_or_skip(PROGRAM, "MRA_HAVE_THREAD_SANITIZER", "-fsanitize=thread")


def run_racecheck(what: str) -> subprocess.CompletedProcess:
    command = [str(racecheck_program()), what]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if "unexpected memory mapping" in result.stderr and shutil.which("setarch"):
        # GCC 12's ThreadSanitizer and a kernel randomising more address bits: run without.
        result = subprocess.run(["setarch", platform.machine(), "-R", *command], capture_output=True,
                                text=True, timeout=900)
    return result


@pytest.mark.parametrize("kernel, has_race", SMALL_KERNELS.items())
def test_racecheck_tells_a_race_from_ordered_accesses(kernel, has_race):
    """Each small kernel runs once, under one schedule: the report does not depend on a
    schedule making the race change a value."""
    result = run_racecheck(kernel)
    if has_race:
        assert result.returncode == 66, result.stdout + result.stderr  # ThreadSanitizer's exit code
        assert "WARNING: ThreadSanitizer: data race" in result.stderr
        assert "racecheckDriver.cpp" in result.stderr  # both accesses, in the kernel's source
    else:
        assert result.returncode == 0, result.stderr
        assert "ThreadSanitizer" not in result.stderr
        assert f"ran {kernel}" in result.stdout


def test_a_ctas_exit_races_with_another_ctas_read_of_its_shared_memory():
    """Without a cluster.sync before exiting, CTA 0 may exit while CTA 1 still reads its shared
    memory. The emulation fails such a launch only when the read comes after the exit; here
    CTA 1 reads first (schedule 1), and the race is with the exit's write of that memory."""
    result = run_racecheck("exit-before-another-ctas-read")
    assert result.returncode == 66, result.stdout + result.stderr
    report = result.stderr
    assert "exitCta" in report and "readsAnotherCtasCells" in report, report


def test_a_clusters_static_shared_memory_fails_the_launch():
    """The emulation keeps a static __shared__ variable at one address for all of a cluster's
    CTAs, which ThreadSanitizer would report as a race between them: the launch fails instead,
    in one line that says what to do."""
    result = run_racecheck("static-shared-in-a-cluster")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "wrote a static __shared__ variable" in result.stderr
    assert "give the kernel dynamic shared memory" in result.stderr
    assert "ThreadSanitizer" not in result.stderr


def test_a_failed_launch_leaves_racecheck_quiet():
    """A launch that fails (a __syncthreads reached at two lines) abandons the threads waiting
    in the barrier: the driver reports the failure, and ThreadSanitizer nothing."""
    result = run_racecheck("divergent-barrier")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "launch failed:" in result.stderr and "(divergent)" in result.stderr
    assert "ThreadSanitizer" not in result.stderr


def test_the_kernels_have_no_data_race():
    """Every kernel of the attention, in each of its shapes: the selection in clusters of 8 and
    of 2 CTAs (reading each other's shared memory) and in CTAs alone, fp32 and tensor-core
    high-resolution CTAs split over two thread groups and not, head sizes 32 and 64, both modes,
    prior blocks, a ragged batch, and 129 blocks (two chunks of the low-resolution terms)."""
    result = run_racecheck("attention")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "ThreadSanitizer" not in result.stderr
    assert result.stdout.rstrip().endswith("ran attention")
    variants = {(dtype, int(threads)) for dtype, threads in
                re.findall(r" (float32|float16|bfloat16), .* CTAs of (\d+) threads", result.stdout)}
    # fp32: 256 threads split, 128 not; tensor cores: 128 split, 64 not.
    assert {("float32", 256), ("float32", 128), ("float16", 128), ("float16", 64),
            ("bfloat16", 128)} <= variants, variants
    selections = set(re.findall(r"selection in (clusters of \d+|CTAs alone)", result.stdout))
    assert {"clusters of 8", "clusters of 2", "CTAs alone"} <= selections, selections
