"""mra_export/fenced_memory.py: the fenced host memory the emulated kernels run on, in which a
read or write past a buffer's end (or before its start) faults."""

from __future__ import annotations

import ctypes
import mmap
import signal
import subprocess
import sys

import pytest
import torch

from mra_export.fenced_memory import FencedBuffer, FencedBuffers

# Touches the byte just inside the fenced edge, then the one just outside it.
TOUCH_ACROSS_THE_FENCE = """
import ctypes, sys
from mra_export.fenced_memory import FencedBuffer
side = sys.argv[1]
buffer = FencedBuffer(4096 + 48, 16, side)
address = buffer.tensor(__import__("torch").uint8, (buffer.nbytes,)).data_ptr()
inside, outside = (address + buffer.nbytes - 1, address + buffer.nbytes) if side == "after" else (
    address, address - 1)
ctypes.string_at(inside, 1)
print("inside read", flush=True)
ctypes.string_at(outside, 1)
print("outside read", flush=True)
"""


@pytest.mark.parametrize("side", ["after", "before"])
def test_a_copy_keeps_values_strides_and_alignment_against_its_page(side):
    token_major = torch.randn(2, 45, 3, 64).transpose(1, 2)  # [B, H, S, D] seen in bshd memory
    fenced = FencedBuffers(side)
    copy = fenced.copy("query", token_major)
    mask = fenced.copy("mask", torch.ones(3, 45, dtype=torch.int32), alignment=4)
    assert torch.equal(copy, token_major) and copy.stride() == token_major.stride()
    assert copy.data_ptr() % 16 == 0
    for tensor in (copy, mask):
        nbytes = tensor.numel() * tensor.element_size()
        edge = tensor.data_ptr() + nbytes if side == "after" else tensor.data_ptr()
        assert edge % mmap.PAGESIZE == 0  # flush against the unmapped page
    fenced.check("test")


@pytest.mark.parametrize("side", ["after", "before"])
def test_a_touch_across_the_fence_faults(side):
    run = subprocess.run([sys.executable, "-c", TOUCH_ACROSS_THE_FENCE, side],
                         capture_output=True, text=True, timeout=120)
    assert "inside read" in run.stdout and "outside read" not in run.stdout, run.stdout + run.stderr
    assert run.returncode == -signal.SIGSEGV


def test_a_write_into_the_alignment_gap_is_named():
    """A buffer whose size is not a multiple of its alignment ends before the page, with a
    canary in the gap: a write there is reported with the buffer's name."""
    fenced = FencedBuffers()
    odd = fenced.empty("output", torch.float16, (3,))  # 6 bytes, 16-aligned: a 10-byte gap
    fenced.check("kernels")
    ctypes.memset(odd.data_ptr() + 6, 0, 1)
    with pytest.raises(RuntimeError, match="^kernels wrote past the end of its output$"):
        fenced.check("kernels")


def test_memory_starts_as_garbage_and_a_wrong_side_is_refused():
    assert torch.isnan(FencedBuffers().empty("workspace", torch.float32, (5,))).all()
    with pytest.raises(ValueError, match="side must be one of"):
        FencedBuffer(16, 16, "around")
