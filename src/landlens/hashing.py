"""File digests, shared by dataset downloads and weight verification."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_CHUNK = 1 << 20
_CACHE: dict[tuple[str, int, int, str], str] = {}
_LOCK = threading.Lock()


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes with ``algorithm`` (``'sha256'``, ``'md5'``...)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cached_file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """:func:`file_digest`, computed once per process for an unchanged file (path, mtime, size)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size, algorithm)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        hit = file_digest(p, algorithm)
        with _LOCK:
            _CACHE[key] = hit
    return hit
