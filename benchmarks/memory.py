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
