"""Peak memory of the running benchmark process, for the scripts in this folder."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``VmHWM``; ``ru_maxrss`` is not used because a
    child started with fork + exec inherits the parent's peak in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident_mb() -> dict[str, float]:
    """This process's resident memory now, in MiB: ``anon`` (its own allocations) and ``file``
    (pages of memory-mapped files, which the kernel can drop and read again)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        for key, name in (("RssAnon:", "anon"), ("RssFile:", "file")):
            if line.startswith(key):
                out[name] = int(line.split()[1]) / 1024
    return out
