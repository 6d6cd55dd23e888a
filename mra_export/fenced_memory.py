"""Host memory that stands for device memory in the emulated kernels' calls, fenced as
compute-sanitizer's memcheck fences allocations on a GPU, only tighter.

Each buffer is exactly its size and lies against an unmapped page: after its end (``"after"``:
a read or write past the end faults) or before its start (``"before"``: one before the start
faults). Where alignment leaves a gap of under ``alignment`` bytes between the end and the page,
the gap holds a canary, so a write there shows (``FencedBuffer.canary_intact``).

On a GPU a read past a PyTorch tensor usually lands in the caching allocator's block and is
caught by nothing; here it faults. The emulated kernels otherwise run on plain host memory
(plugins/tests/cuda_emulation/cudaEmulation.h lists what the emulation does not model).
"""

from __future__ import annotations

import ctypes
import math
import mmap

import torch

SIDES = ("after", "before")
_CANARY = 0xA5
_PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def check_side(side: str) -> str:
    """``side`` if it is one of SIDES, else a ValueError naming them."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    return side


class FencedBuffer:
    """``nbytes`` bytes starting ``alignment``-aligned, fenced on ``side`` by an unmapped page;
    filled with 0xff (NaN as float), as device memory is garbage. The mapping lives as long as
    this buffer or any tensor made from it."""

    def __init__(self, nbytes: int, alignment: int, side: str = "after"):
        check_side(side)
        page = mmap.PAGESIZE
        pages = -(-(nbytes + alignment) // page) + 1
        self._map = mmap.mmap(-1, pages * page)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)  # the whole mapping
        guard = (pages - 1) * page if side == "after" else 0
        if _libc.mprotect(self._bytes.data_ptr() + guard, page, _PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed on a fenced buffer's guard page")
        self.start = (guard - nbytes) // alignment * alignment if side == "after" else page
        self.nbytes = nbytes
        self._gap = self._bytes[self.start + nbytes:guard] if side == "after" else self._bytes[:0]
        self._bytes[self.start:self.start + nbytes].fill_(0xFF)
        self._gap.fill_(_CANARY)

    def tensor(self, dtype: torch.dtype, shape, stride=None) -> torch.Tensor:
        """The buffer seen as a tensor of ``shape`` (and ``stride``, a dense one by default)."""
        if stride is None:
            stride = torch.empty(shape, device="meta").stride()
        return self._bytes[self.start:self.start + self.nbytes].view(dtype).as_strided(shape, stride)

    def canary_intact(self) -> bool:
        """Whether nothing was written between the buffer's end and its guard page."""
        return bool((self._gap == _CANARY).all())


class FencedBuffers:
    """The buffers of one call, each a FencedBuffer on ``side``; ``check`` after the call."""

    def __init__(self, side: str = "after"):
        self.side = side
        self._buffers: dict[str, FencedBuffer] = {}

    def empty(self, name: str, dtype: torch.dtype, shape, stride=None,
              alignment: int = 16) -> torch.Tensor:
        """An uninitialised (0xff) tensor of ``shape`` and ``stride`` (dense by default)."""
        nbytes = math.prod(shape) * dtype.itemsize
        self._buffers[name] = FencedBuffer(nbytes, alignment, self.side)
        return self._buffers[name].tensor(dtype, shape, stride)

    def empty_like(self, name: str, tensor: torch.Tensor, alignment: int = 16) -> torch.Tensor:
        """An uninitialised (0xff) tensor of a dense ``tensor``'s dtype, shape and strides."""
        return self.empty(name, tensor.dtype, tensor.shape, tensor.stride(), alignment)

    def copy(self, name: str, tensor: torch.Tensor, alignment: int = 16) -> torch.Tensor:
        """A copy of a dense CPU ``tensor``, with its shape and strides."""
        return self.empty_like(name, tensor, alignment).copy_(tensor)

    def check(self, who: str) -> None:
        """A RuntimeError naming the first buffer ``who`` wrote past the end of, if any."""
        for name, buffer in self._buffers.items():
            if not buffer.canary_intact():
                raise RuntimeError(f"{who} wrote past the end of its {name}")
