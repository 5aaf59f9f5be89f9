"""Tiling a scene into chips: windows on the chip grid, chips mostly without data skipped.

:func:`chip_windows` lays square windows of ``chip`` pixels every ``stride`` pixels from the
grid's top-left corner; where the last window of a row or column would stop short of the
grid's edge, one more window is laid flush with that edge, so the whole scene is covered
(scenes smaller than one chip give none). :func:`tile_scene` opens a scene
(:class:`~landlens.scenes.reader.Scene`), keeps the windows in which at least ``min_valid`` of
the pixels hold data (only each window's mask is read, one window at a time; a scene without
nodata or mask reads nothing), and returns each chip's canonical reference and footprints.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from landlens.errors import LandlensError
from landlens.scenes.reader import PERCENTILES, Ring, Scene, Window
from landlens.scenes.refs import ChipRef, Stretch

DEFAULT_CHIP = 256
DEFAULT_MIN_VALID = 0.5
"""Chips with a smaller share of pixels holding data are skipped."""


def _offsets(size: int, chip: int, stride: int) -> list[int]:
    if size < chip:
        return []
    out = list(range(0, size - chip + 1, stride))
    if out[-1] + chip < size:
        out.append(size - chip)
    return out


def chip_windows(width: int, height: int, chip: int, stride: int | None = None) -> list[Window]:
    """Windows ``(col, row, chip, chip)`` of a ``width`` x ``height`` grid, row by row (module
    docstring); ``stride`` defaults to ``chip`` (no overlap)."""
    stride = chip if stride is None else int(stride)
    if chip < 1 or stride < 1:
        raise LandlensError(f"--chip {chip} and --stride {stride} must be positive")
    return [(c, r, chip, chip) for r in _offsets(int(height), int(chip), stride)
            for c in _offsets(int(width), int(chip), stride)]


def check_min_valid(min_valid: float) -> float:
    """``min_valid`` as a float, or one error line when it is not a share between 0 and 1."""
    if not 0.0 <= float(min_valid) <= 1.0:
        raise LandlensError(f"--min-valid {min_valid}: a share between 0 and 1")
    return float(min_valid)


def scene_windows(scene: Scene, chip: int, stride: int | None = None) -> list[Window]:
    """:func:`chip_windows` of an open scene's chip grid; one error line when the scene is
    smaller than one chip."""
    windows = chip_windows(scene.grid.width, scene.grid.height, int(chip), stride)
    if not windows:
        raise LandlensError(f"{scene.path}: the scene ({scene.grid.width}x{scene.grid.height} pixels"
                            f"{f' at {scene.gsd:g} m' if scene.gsd else ''}) is smaller than one {chip}-pixel chip")
    return windows


@dataclass(frozen=True)
class Chip:
    """One chip of a tiled scene: its reference, the share of its pixels holding data, and its
    footprint in the scene CRS and in WGS84 (closed counter-clockwise rings, lon/lat)."""

    ref: ChipRef
    valid: float
    footprint: Ring
    footprint_wgs84: Ring

    @property
    def window(self) -> Window:
        return self.ref.window


@dataclass
class SceneTiles:
    """What :func:`tile_scene` made: the scene's facts and settings, its chips, and how many
    windows were skipped for holding too little data."""

    scene: dict[str, Any]
    chips: list[Chip] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.chips)


def tile_scene(path: str | os.PathLike[str], *, chip: int = DEFAULT_CHIP, stride: int | None = None,
               gsd: float | None = None, bands: Sequence[int] | None = None, nodata: float | None = None,
               stretch: str | Stretch = "auto", percentiles: tuple[float, float] = PERCENTILES,
               resampling: str | None = None, min_valid: float = DEFAULT_MIN_VALID,
               progress: bool = False) -> SceneTiles:
    """Tile the scene at ``path`` into chips of ``chip`` x ``chip`` pixels of the chip grid
    (settings as :class:`~landlens.scenes.reader.Scene`; ``stride`` defaults to ``chip``), leaving
    out windows where less than ``min_valid`` of the pixels hold data.

    Raises:
        ImageReadError: the scene cannot be read, has no CRS, or lacks a band asked for.
        LandlensError: bad settings, or a scene smaller than one chip.
    """
    check_min_valid(min_valid)
    with Scene(path, bands=bands, gsd=gsd, resampling=resampling, stretch=stretch, percentiles=percentiles,
               nodata=nodata) as scene:
        windows = scene_windows(scene, chip, stride)
        it: Any = windows
        if progress:
            from tqdm import tqdm

            it = tqdm(windows, desc=f"tiling {os.path.basename(os.fspath(path))}", unit="chip", file=sys.stderr)
        kept, shares = [], []
        for w in it:
            share = scene.valid_fraction(w)
            if share >= float(min_valid) and share > 0:
                kept.append(w)
                shares.append(share)
        native, wgs = scene.footprints(kept)
        chips = [Chip(scene.ref(w), s, n, g) for w, s, n, g in zip(kept, shares, native, wgs)]
        info = scene.describe()
    info.update(chip=int(chip), stride=int(stride or chip), min_valid=float(min_valid), windows=len(windows))
    return SceneTiles(info, chips, len(windows) - len(chips))


__all__ = ["DEFAULT_CHIP", "DEFAULT_MIN_VALID", "Chip", "SceneTiles", "check_min_valid", "chip_windows",
           "scene_windows", "tile_scene"]
