"""Timing (median after warm-up) and peak working memory of one inference.

Memory is the peak of the process's resident set during the first run at a shape, above its
level just before (a thread samples /proc/self/statm every millisecond; freed heap is returned to
the system with malloc_trim between measurements). It covers every allocator: PyTorch's and
onnxruntime's. The first run is also the warm-up. For runs on a GPU it is the device's memory in
use instead (cudaMemGetInfo through torch, sampled the same way, PyTorch's cache emptied first),
which covers onnxruntime's and TensorRT's allocations too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def release_freed_memory() -> None:
    _libc.malloc_trim(0)


def device_used_bytes() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def release_cached_device_memory() -> None:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class PeakMemory:
    """Context manager: ``peak`` is the highest use above the level at entry, by default of the
    resident set (``used`` and ``release`` say what to sample and what to free first)."""

    def __init__(self, interval: float = 0.001, used=resident_bytes, release=release_freed_memory):
        self.interval, self.peak = interval, 0
        self._used, self._release = used, release
        self._stop = threading.Event()

    def __enter__(self):
        self._release()
        self.base = self._used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def restart(self) -> int:
        """Start a new peak from the present level (above entry), which it returns."""
        self.peak = self._used() - self.base
        return self.peak

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used() - self.base)


def measure(run, min_runs: int = 3, max_runs: int = 10, budget_s: float = 20.0,
            on_gpu: bool = False) -> dict:
    """Median seconds of ``run`` over repeated calls after one warm-up, and its peak memory
    (the GPU's when ``on_gpu``)."""
    memory = (PeakMemory(used=device_used_bytes, release=release_cached_device_memory)
              if on_gpu else PeakMemory())
    with memory:
        start = time.perf_counter()
        run()
        warmup = time.perf_counter() - start
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "runs": len(times), "warmup_s": warmup,
            "peak_memory_mb": memory.peak / 2**20, "memory": "gpu" if on_gpu else "host"}
