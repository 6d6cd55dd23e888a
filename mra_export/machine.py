"""What the machine's CPU is, as Linux's /proc/cpuinfo says: the bench names the CPU its
results depend on, and quantize reads whether it has VNNI."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(label: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first non-empty value of ``label`` ("model name", "flags", ...) in ``cpuinfo``; None
    where the file or the label is missing (other systems, other architectures)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == label and value.strip():
            return value.strip()
    return None


def cpu_without_vnni(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this is an x86 CPU with AVX2 and no VNNI (AVX-512 VNNI or AVX-VNNI), as Linux
    lists its flags; False where it does not list them."""
    flags = set((cpuinfo_field("flags", cpuinfo) or "").split())
    return "avx2" in flags and not any("vnni" in flag for flag in flags)
