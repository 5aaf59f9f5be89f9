"""One way to write a file so that readers see the old content or the new, never a part.

Every file landlens writes for a user (feature shards, manifests, run files, model files,
reports, galleries) goes through :func:`atomic_path`: the content is written to a temporary
file in the same folder, flushed to disk, and renamed over the target (``os.replace``, atomic
on POSIX and Windows); if anything fails the temporary file is removed and the target is left
as it was. Folders made of several files (an archive generation, an index) are written into a
temporary folder, flushed, and renamed into place by :func:`atomic_folder`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` when the block ends well
    (for writers that need a file name: safetensors, ONNX, ``shutil.copyfile``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """An open file (``mode`` ``"wb"`` or ``"w"``, ``kwargs`` to :func:`open`) whose content
    replaces ``path`` when the block ends well."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """Flush every file and folder under ``path`` (and ``path`` itself) to disk."""
    root = Path(path)
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(p)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``path`` (``.NAME.*.tmp``) to fill; when the block ends well it is
    flushed to disk and renamed to ``path`` (a folder already there, left by an interrupted
    writer, is replaced); if anything fails it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_default(o: Any) -> Any:
    """NumPy numbers and arrays, and paths, as JSON values (anything else is a bug: TypeError)."""
    kind = type(o).__module__
    if kind == "numpy" and hasattr(o, "tolist"):  # numpy scalars and arrays, without importing numpy here
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 1, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; NumPy values and paths
    become plain JSON values."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False,
                                       default=json_default) + "\n")


__all__ = ["atomic_file", "atomic_folder", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir", "fsync_tree", "json_default"]
