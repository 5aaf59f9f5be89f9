"""What the benchmark scripts in this folder measure in a process of their own: its memory, and
the one JSON result a child process hands back to the script that started it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

RESULT = "RESULT "


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


def emit_result(doc: Any) -> None:
    """Print ``doc`` as the child's result line (what :func:`child_result` reads)."""
    print(RESULT + json.dumps(doc), flush=True)


def child_result(cmd: list[str], **run: Any) -> Any:
    """Run ``cmd`` (``run``: further :func:`subprocess.run` arguments) and return the result its
    :func:`emit_result` printed; exit with its error output if it failed or printed none."""
    res = subprocess.run(cmd, capture_output=True, text=True, **run)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith(RESULT)), None)
    if res.returncode or line is None:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads(line[len(RESULT):])
