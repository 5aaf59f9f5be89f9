"""What an archive records about each image: its catalog row (:class:`ImageRecord`), where a chip
of a scene lies (:class:`GeoRecord`), how names, paths and content digests are formed, and the
archive's errors. The on-disk layout that holds them is :mod:`landlens.retrieval.generations`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from landlens.errors import LandlensError

UPLOAD_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}
"""File suffix of an uploaded image kept in ``uploads/``, by format."""

CLASS_NAME_LIMIT = 200
"""Longest class name an archive accepts (characters)."""


class ArchiveError(LandlensError):
    """A user error about an archive: a missing or damaged folder, an unknown id, a bad update."""


class UnknownImageError(ArchiveError):
    """An image id that is not in the archive (the service answers 404)."""


def validate_class_name(name: str | None) -> str | None:
    """A class name as archives store it: surrounding space stripped, ``None`` or ``""`` for
    none; refused (:class:`ArchiveError`) when longer than :data:`CLASS_NAME_LIMIT` characters
    or holding a character that is not printable (a control character, a newline)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ArchiveError(f"bad class name {name!r}: not text")
    name = name.strip()
    if not name:
        return None
    if len(name) > CLASS_NAME_LIMIT or not name.isprintable():
        raise ArchiveError(f"bad class name {name[:60]!r}: use printable text of at most "
                           f"{CLASS_NAME_LIMIT} characters")
    return name


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image. ``path`` is the server-side file and is never part of :meth:`to_dict`."""

    id: int
    path: str
    name: str
    class_name: str | None
    width: int
    height: int
    sha256: str
    bytes: int
    added: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "class": self.class_name, "width": self.width,
                "height": self.height, "sha256": self.sha256, "bytes": self.bytes, "added": self.added}


def image_name(path: str) -> str:
    """How an image is named in listings: its file name, or ``scene.tif#window=COL,ROW,W,H``
    for a chip of a scene."""
    from landlens.scenes.refs import parse_chip_ref

    try:
        ref = parse_chip_ref(path)
    except LandlensError:
        ref = None
    return ref.short if ref is not None else Path(path).name


def stored_path(path: str | os.PathLike[str]) -> str:
    """The path an archive records for an image: the absolute file, or for a chip of a scene its
    canonical reference (absolute scene path, every setting written out, so it decodes the same
    wherever and whenever it is read)."""
    from landlens.scenes.refs import parse_chip_ref

    ref = parse_chip_ref(path)
    if ref is None:
        return str(Path(path).resolve())
    from landlens.scenes.reader import resolve

    return str(resolve(replace(ref, scene=str(Path(ref.scene).resolve()))))


@dataclass(frozen=True)
class GeoRecord:
    """Where a chip of a scene lies (the ``geo`` table of the catalog; JSON in :meth:`to_dict`).

    ``window`` is ``(col, row, width, height)`` on the scene's chip grid (its own pixels, or the
    grid at ``gsd`` metres); ``transform`` maps the chip's pixel corners to the scene CRS
    (``x = a*col + b*row + c``, ``y = d*col + e*row + f``); ``footprint`` and ``footprint_wgs84``
    are closed counter-clockwise rings through the window's four corners (WGS84 in longitude,
    latitude order); ``bounds`` is ``(west, south, east, north)`` of the WGS84 ring.
    """

    scene: str
    window: tuple[int, int, int, int]
    gsd: float | None
    crs: str
    transform: tuple[float, ...]
    footprint: tuple[tuple[float, float], ...]
    footprint_wgs84: tuple[tuple[float, float], ...]
    bounds: tuple[float, float, float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeoRecord":
        return cls(str(d["scene"]), tuple(int(v) for v in d["window"]),  # type: ignore[arg-type]
                   None if d.get("gsd") is None else float(d["gsd"]), str(d["crs"]),
                   tuple(float(v) for v in d["transform"]),
                   tuple((float(x), float(y)) for x, y in d["footprint"]),
                   tuple((float(x), float(y)) for x, y in d["footprint_wgs84"]),
                   tuple(float(v) for v in d["bounds"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"scene": self.scene, "window": list(self.window), "gsd": self.gsd, "crs": self.crs,
                "transform": list(self.transform), "footprint": [list(p) for p in self.footprint],
                "footprint_wgs84": [list(p) for p in self.footprint_wgs84], "bounds": list(self.bounds)}


def chip_geo(paths: list[str]) -> list[GeoRecord | None]:
    """Per image path, its :class:`GeoRecord` when it is a chip reference, else ``None``
    (each scene opened once)."""
    from landlens.scenes.refs import parse_chip_ref

    refs = [parse_chip_ref(p) for p in paths]
    chips = [(i, r) for i, r in enumerate(refs) if r is not None]
    out: list[GeoRecord | None] = [None] * len(paths)
    if chips:
        from landlens.scenes.reader import chip_geo as scene_chip_geo

        for (i, _), d in zip(chips, scene_chip_geo([r for _, r in chips])):
            out[i] = GeoRecord.from_dict(d)
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: Path) -> tuple[str, int]:
    """``(sha256, bytes)`` of a file's content; for a chip of a scene, the chip's digest and
    sample bytes (:func:`landlens.scenes.reader.chip_digest`)."""
    from landlens.scenes.refs import parse_chip_ref

    ref = parse_chip_ref(path)
    if ref is not None:
        from landlens.scenes.reader import chip_digest

        return chip_digest(ref)
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def describe_file(path: Path) -> tuple[int, int, str, int]:
    """(width, height, sha256, bytes) of an image file (header only: no decoding)."""
    from landlens.data.io import probe_image

    info = probe_image(path)
    sha, size = sha256_file(path)
    return info.width, info.height, sha, size


__all__ = ["CLASS_NAME_LIMIT", "UPLOAD_SUFFIXES", "ArchiveError", "GeoRecord", "ImageRecord", "UnknownImageError",
           "chip_geo", "describe_file", "image_name", "sha256_file", "stored_path", "utc_now", "validate_class_name"]
