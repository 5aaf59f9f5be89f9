"""Chip references: one string that names a window of a scene and how to read it.

A chip of a GeoTIFF scene is addressed like a file, so that every reader of image files in
landlens (extraction, archive queries, ``index add``, thumbnails, prediction) takes it unchanged::

    /data/scenes/drone.tif#window=512,256,256,256&bands=1,2,3&gsd=0.3&resampling=average&stretch=none

The part before the last ``#`` is the scene file; the fragment is ``key=value`` pairs joined by
``&``, ``window`` first:

``window=COL,ROW,W,H`` (required)
    the chip's pixel window on the scene's *chip grid*: the scene's own pixel grid, or, with
    ``gsd``, the grid of square pixels of that size anchored at the scene's top-left corner.
``bands=B1,B2,B3`` (or one band, shown as gray)
    1-based band numbers shown as red, green, blue, as GDAL counts them (default: the bands
    whose colour interpretation is red, green, blue, else bands 1, 2, 3, bands 4, 3, 2 of a
    13-band scene, band 1 of a one- or two-band scene).
``gsd=G``
    ground sampling distance of the chip grid in metres (absent: the scene's own grid).
``resampling=NAME``
    how the scene is resampled to ``gsd`` (GDAL names: ``average``, ``bilinear``,
    ``nearest``...; default ``average`` when the grid is coarser than the scene, ``bilinear``
    when finer).
``stretch=LO:HI,LO:HI,LO:HI`` or ``stretch=none``
    the radiometric mapping to 8 bits, per shown band: ``round((v - LO) * 255 / (HI - LO))``
    clipped to 0-255, or the samples as they are (clipped) with ``none``. Absent: the scene's
    default, computed once per scene (:func:`landlens.scenes.reader.default_stretch`).
``nodata=V``
    a sample value that marks pixels without data, when the file declares none (pixels whose
    shown bands all equal it); otherwise the file's own nodata value or mask is used.

:func:`parse_chip_ref` recognises such strings (a path that exists as a file is always a file);
``str(ChipRef)`` writes the canonical form that archives record, so equal chips have equal
references. This module needs no rasterio.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from landlens.errors import ImageReadError

MARK = "#window="
"""What a chip reference holds between the scene's file name and its window."""

KEYS = ("window", "bands", "gsd", "resampling", "stretch", "nodata")
"""Fragment keys, in the order the canonical form writes them."""

RESAMPLINGS = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode", "min", "max", "med",
               "q1", "q3", "rms")
"""Resampling names accepted in ``resampling=`` (GDAL's warp resampling methods)."""

Stretch = tuple[tuple[float, float], ...]
"""Per shown band ``(lo, hi)``; ``()`` means the samples as they are (``stretch=none``)."""


def _num(x: float) -> str:
    """The shortest text that reads back as the same float (``0.3``, ``7421``, ``1e-05``)."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


@dataclass(frozen=True)
class ChipRef:
    """A parsed chip reference (module docstring). ``None`` fields take the scene's defaults."""

    scene: str
    window: tuple[int, int, int, int]
    bands: tuple[int, ...] | None = None
    gsd: float | None = None
    resampling: str | None = None
    stretch: Stretch | None = None
    nodata: float | None = None

    def __post_init__(self) -> None:
        c, r, w, h = self.window
        if w <= 0 or h <= 0 or c < 0 or r < 0:
            raise ValueError(f"bad chip window {self.window}: offsets >= 0, sizes > 0")
        if self.bands is not None and (len(self.bands) not in (1, 3) or any(b < 1 for b in self.bands)):
            raise ValueError(f"bad bands {self.bands}: one or three band numbers, counted from 1")
        if self.gsd is not None and not (math.isfinite(self.gsd) and self.gsd > 0):
            raise ValueError(f"bad gsd {self.gsd}: a positive number of metres")
        if self.resampling is not None and self.resampling not in RESAMPLINGS:
            raise ValueError(f"unknown resampling {self.resampling!r} ({', '.join(RESAMPLINGS)})")
        if self.stretch and self.bands is not None and len(self.stretch) != len(self.bands):
            raise ValueError(f"stretch gives {len(self.stretch)} bands for {len(self.bands)} shown")

    @property
    def width(self) -> int:
        return self.window[2]

    @property
    def height(self) -> int:
        return self.window[3]

    def fragment(self) -> str:
        """The canonical fragment (after ``#``), without the scene path."""
        parts = ["window=" + ",".join(str(int(v)) for v in self.window)]
        if self.bands is not None:
            parts.append("bands=" + ",".join(str(int(b)) for b in self.bands))
        if self.gsd is not None:
            parts.append(f"gsd={_num(self.gsd)}")
        if self.resampling is not None:
            parts.append(f"resampling={self.resampling}")
        if self.stretch is not None:
            parts.append("stretch=" + (",".join(f"{_num(lo)}:{_num(hi)}" for lo, hi in self.stretch)
                                       if self.stretch else "none"))
        if self.nodata is not None:
            parts.append(f"nodata={_num(self.nodata)}")
        return "&".join(parts)

    def __str__(self) -> str:
        return f"{self.scene}#{self.fragment()}"

    def with_window(self, window: tuple[int, int, int, int]) -> "ChipRef":
        """The same scene and settings, another window."""
        return replace(self, window=tuple(int(v) for v in window))  # type: ignore[arg-type]

    @property
    def short(self) -> str:
        """``scene-file-name#window=COL,ROW,W,H``: how a chip is named in listings."""
        return f"{Path(self.scene).name}#window=" + ",".join(str(int(v)) for v in self.window)


def looks_like_chip_ref(path: object) -> bool:
    """Whether ``path`` has the form of a chip reference (a cheap text test, no file access)."""
    return isinstance(path, (str, os.PathLike)) and MARK in os.fspath(path)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what}={text!r}: integers separated by commas") from None


def _float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{what}={text!r}: not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{what}={text!r}: not a finite number")
    return v


def _stretch(text: str) -> Stretch:
    if text == "none":
        return ()
    out = []
    for part in text.split(","):
        lo, sep, hi = part.partition(":")
        if not sep:
            raise ValueError(f"stretch={text!r}: LO:HI per band, separated by commas, or 'none'")
        out.append((_float(lo, "stretch"), _float(hi, "stretch")))
    return tuple(out)


def parse_fragment(scene: str, fragment: str) -> ChipRef:
    """The :class:`ChipRef` of ``scene`` and a fragment such as ``window=0,0,256,256&gsd=0.3``.

    Raises:
        ValueError: a malformed fragment (an unknown or repeated key, a bad value).
    """
    values: dict[str, str] = {}
    for item in fragment.split("&"):
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"unknown chip setting {item!r} (known: {', '.join(KEYS)})")
        if key in values:
            raise ValueError(f"chip setting {key!r} given twice")
        values[key] = value
    if "window" not in values:
        raise ValueError("no window=COL,ROW,W,H")
    window = _ints(values["window"], "window")
    if len(window) != 4:
        raise ValueError(f"window={values['window']!r}: four integers COL,ROW,W,H")
    return ChipRef(
        scene=scene,
        window=window,  # type: ignore[arg-type]
        bands=_ints(values["bands"], "bands") if "bands" in values else None,
        gsd=_float(values["gsd"], "gsd") if "gsd" in values else None,
        resampling=values.get("resampling"),
        stretch=_stretch(values["stretch"]) if "stretch" in values else None,
        nodata=_float(values["nodata"], "nodata") if "nodata" in values else None,
    )


def parse_chip_ref(path: object) -> ChipRef | None:
    """The chip reference ``path`` is, or ``None`` when it is an ordinary path.

    A string with ``#window=`` after its last path separator is a chip reference unless a file
    of exactly that name exists.

    Raises:
        ImageReadError: a chip reference with a malformed fragment, naming it.
    """
    if not looks_like_chip_ref(path):
        return None
    text = os.fspath(path)  # type: ignore[arg-type]
    scene, _, fragment = text.rpartition("#")
    if not fragment.startswith("window=") or "/" in fragment or os.sep in fragment:
        return None
    if os.path.lexists(text):
        return None
    try:
        return parse_fragment(scene, fragment)
    except ValueError as exc:
        raise ImageReadError(text, f"bad chip reference: {exc}") from None


__all__ = ["KEYS", "MARK", "RESAMPLINGS", "ChipRef", "Stretch", "looks_like_chip_ref", "parse_chip_ref",
           "parse_fragment"]
