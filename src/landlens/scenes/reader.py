"""Reading georeferenced scenes by windows: bands, nodata, resampling to a GSD, 8-bit RGB.

A :class:`Scene` is an open raster (any GDAL format rasterio reads: GeoTIFF, COG, any CRS,
8/16-bit or float samples, any band count) together with the settings its chips are read with.
Nothing is ever read whole: a chip is one windowed read of the bands it shows (and of their
mask), and the one scene-wide read, for the stretch below, is a decimated one of at most
:data:`STATS_SIDE` pixels a side (GDAL takes it from an overview when the file has one).

**Chip grid.** Without ``gsd`` chips are windows of the scene's own pixel grid. With ``gsd``
(metres) they are windows of a grid of square pixels of that size anchored at the scene's
top-left corner and covering the whole pixels of the scene inside it; the scene is resampled to
it by GDAL's warper (:class:`rasterio.vrt.WarpedVRT`, reading only what a window needs),
``average`` when the grid is coarser than the scene, ``bilinear`` when it is finer. ``gsd`` is
in the CRS's linear unit converted to metres (for a geographic CRS: metres at the scene's
centre latitude on a sphere of radius :data:`EARTH_RADIUS`, so pixels are square on the ground
there); a Mercator CRS's metres are map metres (ground metres x 1 / cos(latitude)).

**Bands and nodata.** ``bands`` are 1-based (GDAL's count): three shown as red, green, blue, or
one shown as gray. A pixel has no data when the file's mask says so (nodata value, internal
mask, alpha band: GDAL's mask of each shown band; a pixel is valid when any shown band is), or,
with ``nodata=V`` for a file that declares none, when every shown band equals ``V``; NaN samples
never count as data. Pixels without data are black in the RGB chip, as transparent pixels are
for image files (:mod:`landlens.data.io`).

**Radiometry** (what a backbone gets, 8-bit RGB): a linear map per shown band,
``out = clip(round((v - lo) * 255 / (hi - lo)), 0, 255)`` (``hi <= lo`` gives 0), or the samples
as they are, clipped to 0-255 (``stretch='none'``). ``stretch='auto'`` (the default): 8-bit
scenes as they are, any other sample type stretched between each shown band's 2nd and 98th
percentiles (``stretch='percentile'`` for 8-bit scenes too; ``percentiles=(lo, hi)`` for other
ones), computed once per scene over the valid pixels of the decimated read and recorded in
every chip reference (:mod:`landlens.scenes.refs`), so a chip read again, a query cut later and
an archive built on another machine all get the same pixels. This is the rule
:func:`landlens.data.io.load_rgb` applies per image, made per scene so chips of one scene agree.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landlens.errors import ImageReadError, LandlensError, first_line
from landlens.scenes.geojson import unwrap
from landlens.scenes.refs import RESAMPLINGS, ChipRef, Stretch

STATS_SIDE = 1024
"""Longest side, in pixels, of the decimated read the per-scene stretch is computed on."""

PERCENTILES = (2.0, 98.0)
"""Default percentiles of the per-band linear stretch."""

EARTH_RADIUS = 6_371_008.8
"""Mean Earth radius in metres (IUGG), for a ``gsd`` on a geographic CRS."""

WGS84 = "EPSG:4326"

Window = tuple[int, int, int, int]
"""``(col, row, width, height)`` on a scene's chip grid."""

Ring = list[tuple[float, float]]
"""A closed polygon ring: ``[(x, y), ...]`` with the first position repeated at the end."""


GDAL_CACHE_MIB = 128
"""GDAL's raster block cache, in MiB, unless ``GDAL_CACHEMAX`` is set: with GDAL's own default (5 %
of the RAM) tiling the Landsat scene into 64-px chips at 10 m peaked at 1.8 GiB; with 128 MiB it
took the same 3.0 s and peaked at 252 MiB (``benchmarks/results/scene_maps.md``)."""


def rasterio_module() -> Any:
    """``rasterio``, or one line saying how to install it (the first call caps GDAL's block
    cache at :data:`GDAL_CACHE_MIB` unless the environment sets ``GDAL_CACHEMAX``)."""
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MIB))
    try:
        import rasterio
        import rasterio.errors  # noqa: F401 - used as rasterio.errors
    except ImportError:
        raise LandlensError("reading GeoTIFF scenes needs rasterio: pip install 'landlens[scenes]' "
                            "(or pip install rasterio)") from None
    return rasterio


# --------------------------------------------------------------------------- per-process caches

_stats_cache: dict[tuple[Any, ...], Stretch] = {}
_stats_lock = threading.Lock()


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


def _scene_error(path: object, exc: BaseException) -> ImageReadError:
    return ImageReadError(path, f"cannot read the scene ({first_line(exc, 160)})")


# --------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class Grid:
    """The pixel grid chips are cut on: its affine transform (6 numbers ``a, b, c, d, e, f`` of
    ``x = a*col + b*row + c``, ``y = d*col + e*row + f``), size and CRS."""

    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    crs: str

    def affine(self) -> Any:
        from affine import Affine

        return Affine(*self.transform)


def to_map(transform: Sequence[float], col: float, row: float) -> tuple[float, float]:
    """Map coordinates of the pixel-grid position ``(col, row)`` under a 6-number transform."""
    a, b, c, d, e, f = transform[:6]
    return a * col + b * row + c, d * col + e * row + f


def to_pixel(transform: Sequence[float], x: float, y: float) -> tuple[float, float]:
    """The pixel-grid position ``(col, row)`` of map coordinates ``(x, y)`` (the inverse of :func:`to_map`)."""
    a, b, c, d, e, f = transform[:6]
    det = a * e - b * d
    x, y = x - c, y - f
    return (e * x - b * y) / det, (a * y - d * x) / det


def _pixel_size(crs: Any, gsd: float, transform: Any, height: int) -> tuple[float, float]:
    """Pixel size (x, y) in CRS units for ``gsd`` metres."""
    if crs.is_geographic:
        lat = transform.f + transform.e * height / 2.0
        per_degree = EARTH_RADIUS * math.pi / 180.0
        return gsd / (per_degree * max(math.cos(math.radians(lat)), 1e-6)), gsd / per_degree
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - a CRS without linear units: take them as metres
        factor = 1.0
    size = gsd / factor
    return size, size


def default_bands(count: int, colorinterp: Sequence[Any] = ()) -> tuple[int, ...]:
    """The bands shown when none are asked for (1-based): those interpreted as red, green, blue;
    else 4, 3, 2 of a 13-band (Sentinel-2) scene, the first three non-alpha bands, or band 1."""
    names = [getattr(c, "name", str(c)) for c in colorinterp]
    if all(n in names for n in ("red", "green", "blue")):
        return tuple(names.index(n) + 1 for n in ("red", "green", "blue"))
    if count == 13:
        return (4, 3, 2)
    colour = [i + 1 for i in range(count) if i >= len(names) or names[i] != "alpha"]
    return tuple(colour[:3]) if len(colour) >= 3 else tuple(colour[:1] or [1])


def apply_stretch(data: np.ndarray, stretch: Stretch) -> np.ndarray:
    """``(C, H, W)`` samples to ``(H, W, C)`` uint8 by the module's radiometric rule."""
    x = data.astype(np.float32, copy=False)
    if stretch:
        lo = np.array([s[0] for s in stretch], np.float32)[:, None, None]
        hi = np.array([s[1] for s in stretch], np.float32)[:, None, None]
        span = np.where(hi > lo, hi - lo, np.inf).astype(np.float32)
        x = (x - lo) * (np.float32(255.0) / span)
    x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
    return np.ascontiguousarray(np.rint(np.clip(x, 0.0, 255.0)).astype(np.uint8).transpose(1, 2, 0))


class Scene:
    """An open scene and how its chips are read (module docstring); use it as a context manager.

    Args:
        path: the raster file.
        bands: 1-based bands shown as RGB (three) or gray (one); default :func:`default_bands`.
        gsd: chip-grid pixel size in metres; ``None``: the scene's own grid.
        resampling: a GDAL resampling name for ``gsd`` (default: ``average`` when coarser,
            ``bilinear`` when finer).
        stretch: ``'auto'``, ``'none'``, ``'percentile'`` or explicit ``((lo, hi), ...)`` per band.
        percentiles: those of the percentile stretch.
        nodata: a sample value meaning "no data" for a file that declares none (overrides the
            file's own nodata value when given).

    Attributes:
        grid: the chip grid (:class:`Grid`).
        bands, stretch: as resolved (``stretch`` as ``((lo, hi), ...)`` or ``()`` for none).
    """

    def __init__(self, path: str | os.PathLike[str], *, bands: Sequence[int] | None = None,
                 gsd: float | None = None, resampling: str | None = None, stretch: str | Stretch = "auto",
                 percentiles: tuple[float, float] = PERCENTILES, nodata: float | None = None) -> None:
        rasterio = rasterio_module()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ImageReadError(self.path, "scene file not found" if not os.path.exists(self.path)
                                 else "not a regular file")
        try:
            with warnings.catch_warnings():  # a raster without georeferencing is refused below, in words
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._src = rasterio.open(self.path)
        except Exception as exc:  # noqa: BLE001 - rasterio's errors vary by driver
            raise _scene_error(self.path, exc) from None
        self._vrt: Any = None
        try:
            self._setup(bands, gsd, resampling, stretch, percentiles, nodata)
        except BaseException:
            self.close()
            raise

    def _setup(self, bands: Sequence[int] | None, gsd: float | None, resampling: str | None,
               stretch: str | Stretch, percentiles: tuple[float, float], nodata: float | None) -> None:
        src = self._src
        if src.crs is None:
            raise ImageReadError(self.path, "the raster has no coordinate reference system (not a georeferenced "
                                            "scene); index it as an image instead")
        self.count = int(src.count)
        self.dtype = str(src.dtypes[0])
        self.bands = tuple(int(b) for b in bands) if bands is not None else default_bands(self.count, src.colorinterp)
        if len(self.bands) not in (1, 3):
            raise ImageReadError(self.path, f"bands {list(self.bands)}: give three (red, green, blue) or one (gray)")
        bad = [b for b in self.bands if not 1 <= b <= self.count]
        if bad:
            raise ImageReadError(self.path, f"band {bad[0]} does not exist: the scene has {self.count} band(s), "
                                            f"numbered from 1")
        self.nodata = None if nodata is None else float(nodata)
        self.gsd = None if gsd is None else float(gsd)
        if self.gsd is not None and not (math.isfinite(self.gsd) and self.gsd > 0):
            raise LandlensError(f"--gsd {gsd}: a positive number of metres")
        if resampling is not None and resampling not in RESAMPLINGS:
            raise LandlensError(f"unknown resampling {resampling!r} ({', '.join(RESAMPLINGS)})")
        self.grid, self._native, self.resampling = self._make_grid(resampling)
        self._all_valid = self.nodata is None and all(
            [f.name for f in src.mask_flag_enums[b - 1]] == ["all_valid"] for b in self.bands)
        if isinstance(stretch, str):
            if stretch == "none" or (stretch == "auto" and self.dtype == "uint8"):
                self.stretch: Stretch = ()
            elif stretch in ("auto", "percentile"):
                self.stretch = self.band_percentiles(percentiles)
            else:
                raise LandlensError(f"unknown stretch {stretch!r}: auto, none, percentile")
        else:
            self.stretch = tuple((float(lo), float(hi)) for lo, hi in stretch)
            if self.stretch and len(self.stretch) != len(self.bands):
                raise ImageReadError(self.path, f"stretch gives {len(self.stretch)} bands for {len(self.bands)} shown")

    def _make_grid(self, resampling: str | None) -> tuple[Grid, bool, str | None]:
        src = self._src
        t = src.transform
        crs = src.crs.to_string()
        if self.gsd is None:
            return Grid(tuple(t)[:6], int(src.width), int(src.height), crs), True, None  # type: ignore[arg-type]
        if t.b != 0 or t.d != 0:
            raise ImageReadError(self.path, "--gsd needs a north-up scene (its geotransform is rotated); "
                                            "leave --gsd out to cut chips on its own grid")
        px, py = _pixel_size(src.crs, self.gsd, t, src.height)
        width = int(math.floor(src.width * abs(t.a) / px + 1e-9))
        height = int(math.floor(src.height * abs(t.e) / py + 1e-9))
        if width < 1 or height < 1:
            raise ImageReadError(self.path, f"--gsd {self.gsd:g} is larger than the whole scene")
        grid = Grid((math.copysign(px, t.a), 0.0, t.c, 0.0, math.copysign(py, t.e), t.f), width, height, crs)
        native = (width, height) == (src.width, src.height) and all(
            math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) for a, b in zip(grid.transform, tuple(t)[:6]))
        if native:
            return Grid(tuple(t)[:6], int(src.width), int(src.height), crs), True, None  # type: ignore[arg-type]
        if resampling is None:
            resampling = "average" if px > abs(t.a) * (1 + 1e-9) else "bilinear"
        return grid, False, resampling

    # ------------------------------------------------------------------ describing
    @classmethod
    def from_ref(cls, ref: ChipRef) -> "Scene":
        """The scene of a chip reference, with the reference's settings (defaults where absent)."""
        return cls(ref.scene, bands=ref.bands, gsd=ref.gsd, resampling=ref.resampling,
                   stretch="auto" if ref.stretch is None else ref.stretch, nodata=ref.nodata)

    def ref(self, window: Window) -> ChipRef:
        """The canonical chip reference of ``window`` (every setting written out)."""
        return ChipRef(self.path, tuple(int(v) for v in window), self.bands, self.gsd,  # type: ignore[arg-type]
                       self.resampling if self.gsd is not None else None, self.stretch, self.nodata)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts and settings: file, CRS, size, grid, bands, stretch, nodata."""
        src = self._src
        return {"path": self.path, "crs": self.grid.crs, "width": int(src.width), "height": int(src.height),
                "count": self.count, "dtype": self.dtype, "transform": list(tuple(src.transform)[:6]),
                "grid": {"width": self.grid.width, "height": self.grid.height, "transform": list(self.grid.transform)},
                "gsd": self.gsd, "resampling": self.resampling, "bands": list(self.bands),
                "stretch": [list(s) for s in self.stretch] if self.stretch else "none",
                "nodata": self.nodata if self.nodata is not None else src.nodata}

    # ------------------------------------------------------------------ reading
    def _reader(self) -> Any:
        if self._native:
            return self._src
        if self._vrt is None:
            from rasterio.enums import Resampling
            from rasterio.vrt import WarpedVRT

            kwargs: dict[str, Any] = {"crs": self._src.crs, "transform": self.grid.affine(),
                                      "width": self.grid.width, "height": self.grid.height,
                                      "resampling": Resampling[self.resampling or "average"]}
            if self.nodata is not None:
                kwargs.update(src_nodata=self.nodata, nodata=self.nodata)
            self._vrt = WarpedVRT(self._src, **kwargs)
        return self._vrt

    def _check_window(self, window: Window) -> Any:
        from rasterio.windows import Window as RWindow

        c, r, w, h = (int(v) for v in window)
        if w < 1 or h < 1 or c < 0 or r < 0 or c + w > self.grid.width or r + h > self.grid.height:
            raise ImageReadError(self.path, f"window {c},{r},{w},{h} is outside the scene's chip grid "
                                            f"({self.grid.width}x{self.grid.height})")
        return RWindow(c, r, w, h)

    def _valid(self, ds: Any, data: np.ndarray, **where: Any) -> np.ndarray:
        """Which pixels hold data (``where``: the ``window`` or ``out_shape`` of the read)."""
        if self.nodata is not None:
            nd = np.float32(self.nodata)
            valid = ~(np.isnan(data).all(0) if math.isnan(self.nodata) else (data == nd).all(0))
        elif self._all_valid:
            valid = np.ones(data.shape[1:], bool)
        else:
            valid = (ds.read_masks(indexes=list(self.bands), **where) > 0).any(0)
        if data.dtype.kind == "f":
            valid &= np.isfinite(data).all(0)
        return valid

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """The shown bands of ``window`` as ``(C, H, W)`` samples in the file's type, and which
        pixels hold data (``(H, W)`` bool). One windowed read (and one of the mask)."""
        win = self._check_window(window)
        ds = self._reader()
        try:
            data = ds.read(indexes=list(self.bands), window=win)
            valid = self._valid(ds, data, window=win)
        except Exception as exc:  # noqa: BLE001 - a corrupt block, a codec missing
            raise _scene_error(self.path, exc) from None
        return data, valid

    def to_rgb(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of samples from :meth:`read` by the scene's stretch; no-data
        pixels black."""
        rgb = apply_stretch(data, self.stretch)
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)
        rgb[~valid] = 0
        return rgb

    def read_rgb(self, window: Window) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of ``window`` by the scene's stretch; no-data pixels black."""
        return self.to_rgb(*self.read(window))

    def valid_mask(self, window: Window) -> np.ndarray:
        """Which pixels of ``window`` hold data, ``(H, W)`` bool (reads only the mask, or the
        shown bands with a ``nodata`` value given)."""
        win = self._check_window(window)
        if self._all_valid:
            return np.ones((int(window[3]), int(window[2])), bool)
        ds = self._reader()
        try:
            if self.nodata is not None:
                data = ds.read(indexes=list(self.bands), window=win)
                return self._valid(ds, data)
            return (ds.read_masks(indexes=list(self.bands), window=win) > 0).any(0)
        except Exception as exc:  # noqa: BLE001
            raise _scene_error(self.path, exc) from None

    def valid_fraction(self, window: Window) -> float:
        """The share of ``window``'s pixels that hold data (:meth:`valid_mask`)."""
        if self._all_valid:
            self._check_window(window)
            return 1.0
        return float(self.valid_mask(window).mean())

    def overview(self, max_side: int = 1024) -> np.ndarray:
        """The whole chip grid as ``(h, w, 3)`` uint8 RGB, decimated so its longer side is at most
        ``max_side`` (one decimated read; GDAL takes it from an overview when the file has one);
        for previews."""
        return self.to_rgb(*self._read_decimated(self._reader(), int(max_side)))

    def _read_decimated(self, ds: Any, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The shown bands of the whole dataset ``ds`` (the file, or the chip grid's warped view)
        and their data mask, decimated by one integer step so the longer side is at most
        ``max_side`` (one read; GDAL takes it from an overview when the file has one)."""
        step = max(1, math.ceil(max(ds.width, ds.height) / max_side))
        shape = (len(self.bands), max(1, math.ceil(ds.height / step)), max(1, math.ceil(ds.width / step)))
        try:
            data = ds.read(indexes=list(self.bands), out_shape=shape)
            if self.nodata is not None or self._all_valid:
                return data, self._valid(ds, data)
            return data, self._valid(ds, data, out_shape=shape)
        except Exception as exc:  # noqa: BLE001
            raise _scene_error(self.path, exc) from None

    def band_percentiles(self, percentiles: tuple[float, float] = PERCENTILES) -> Stretch:
        """Per shown band, the ``percentiles`` of its valid samples in a decimated read of the whole
        scene (at most :data:`STATS_SIDE` pixels a side); computed once per process and file."""
        key = (*_file_key(self.path), self.bands, self.nodata, tuple(float(p) for p in percentiles))
        with _stats_lock:
            hit = _stats_cache.get(key)
        if hit is not None:
            return hit
        data, valid = self._read_decimated(self._src, STATS_SIDE)
        if not valid.any():
            raise ImageReadError(self.path, "every pixel is nodata: no stretch can be computed")
        out = []
        for band in data:
            lo, hi = np.percentile(band[valid].astype(np.float64), [float(percentiles[0]), float(percentiles[1])])
            out.append((float(lo), float(hi)))
        stretch = tuple(out)
        with _stats_lock:
            _stats_cache[key] = stretch
        return stretch

    # ------------------------------------------------------------------ geometry
    def window_transform(self, window: Window) -> tuple[float, float, float, float, float, float]:
        """The affine transform of ``window``'s own pixels (as :attr:`Grid.transform`)."""
        a, b, _, d, e, _ = self.grid.transform
        x, y = to_map(self.grid.transform, int(window[0]), int(window[1]))
        return (a, b, x, d, e, y)

    def footprints(self, windows: Sequence[Window]) -> tuple[list[Ring], list[Ring]]:
        """Per window, its outline in the scene CRS and in WGS84 (lon, lat), both as closed
        rings turning counter-clockwise (RFC 7946's right-hand rule) through the four corners
        of the window's outer pixel edges."""
        return footprints(self.grid, windows)

    def to_grid(self, lon: float, lat: float) -> tuple[float, float]:
        """The chip-grid position ``(col, row)`` (fractional) of a WGS84 point."""
        from rasterio.warp import transform

        xs, ys = transform(WGS84, self.grid.crs, [float(lon)], [float(lat)])
        col, row = to_pixel(self.grid.transform, xs[0], ys[0])
        return float(col), float(row)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        if self._vrt is not None:
            self._vrt.close()
            self._vrt = None
        self._src.close()

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Scene({self.path!r}, grid={self.grid.width}x{self.grid.height}, bands={list(self.bands)}, "
                f"gsd={self.gsd}, stretch={'none' if not self.stretch else 'linear'})")


def open_scene(path: str | os.PathLike[str], **settings: Any) -> Scene:
    """Open a scene for windowed reading: :class:`Scene` (``bands``, ``gsd``, ``resampling``,
    ``stretch``, ``percentiles``, ``nodata``); close it, or use it in a ``with`` block."""
    return Scene(path, **settings)


def _ccw(ring: Ring) -> Ring:
    """``ring`` turning counter-clockwise in its (x, y) axes (shoelace sign)."""
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
    return ring if area >= 0 else ring[::-1]


def footprints(grid: Grid, windows: Sequence[Window]) -> tuple[list[Ring], list[Ring]]:
    """See :meth:`Scene.footprints` (one coordinate transformation for all windows)."""
    from rasterio.warp import transform

    native: list[Ring] = []
    for c, r, w, h in windows:
        corners = [(c, r), (c, r + h), (c + w, r + h), (c + w, r), (c, r)]
        native.append(_ccw([to_map(grid.transform, *p) for p in corners]))
    if not native:
        return [], []
    xs = [x for ring in native for x, _ in ring]
    ys = [y for ring in native for _, y in ring]
    lons, lats = transform(grid.crs, WGS84, xs, ys)
    wgs: list[Ring] = []
    for i in range(len(native)):
        ring = [(float(lons[5 * i + k]), float(lats[5 * i + k])) for k in range(5)]
        ring[-1] = ring[0]
        # orientation on continuous longitudes (a ring across the antimeridian), then back to -180..180
        wgs.append([(x - 360.0 if x > 180.0 else x, y) for x, y in _ccw(unwrap(ring))])
    return native, wgs


# --------------------------------------------------------------------------- chip references


def read_chip(ref: ChipRef) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, C)`` samples of a chip in the file's type and its ``(H, W)`` data mask."""
    with Scene.from_ref(ref) as scene:
        data, valid = scene.read(ref.window)
    return np.ascontiguousarray(data.transpose(1, 2, 0)), valid


def read_chip_rgb(ref: ChipRef) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a chip: what :func:`landlens.data.io.load_rgb` returns for it."""
    with Scene.from_ref(ref) as scene:
        return scene.read_rgb(ref.window)


def resolve(ref: ChipRef) -> ChipRef:
    """``ref`` with every default made explicit (bands, resampling, stretch): its canonical form."""
    if ref.bands is not None and ref.stretch is not None and (ref.gsd is None or ref.resampling is not None):
        return ref
    with Scene.from_ref(ref) as scene:
        scene._check_window(ref.window)
        return scene.ref(ref.window)


_headers: dict[tuple[str, int, int], tuple[int, str, str, tuple[Any, ...]]] = {}


def _header(path: str) -> tuple[int, str, str, tuple[Any, ...]]:
    """``(band count, sample type, driver, colour interpretations)`` of a scene file, read once
    per process while the file is unchanged."""
    try:
        key = _file_key(path)
    except OSError as exc:
        raise _scene_error(path, exc) from None
    with _stats_lock:
        hit = _headers.get(key)
    if hit is None:
        rasterio = rasterio_module()
        try:
            with rasterio.open(path) as src:
                hit = (int(src.count), str(src.dtypes[0]), str(src.driver), tuple(src.colorinterp))
        except Exception as exc:  # noqa: BLE001
            raise _scene_error(path, exc) from None
        with _stats_lock:
            _headers[key] = hit
    return hit


def probe_chip(ref: ChipRef) -> tuple[int, int, int, str, str]:
    """``(width, height, bands, sample type, driver)`` of a chip, from the scene's header."""
    count, dtype, driver, colorinterp = _header(ref.scene)
    bands = ref.bands or default_bands(count, colorinterp)
    return ref.width, ref.height, len(bands), dtype, driver


def chip_digest(ref: ChipRef) -> tuple[str, int]:
    """``(sha256, bytes)`` identifying a chip's content: the sha256 of the scene file's sha256
    and the canonical fragment (so the same chip of a moved scene keeps its digest), and the
    bytes of its samples (width x height x shown bands x bytes per sample)."""
    from landlens.hashing import cached_file_digest

    full = resolve(ref)
    w, h, n, dtype, _ = probe_chip(full)
    scene = cached_file_digest(full.scene)
    digest = hashlib.sha256(f"{scene}#{full.fragment()}".encode()).hexdigest()
    return digest, w * h * n * int(np.dtype(dtype).itemsize)


def chip_geo(refs: Sequence[ChipRef]) -> list[dict[str, Any]]:
    """Per chip: scene path, window, gsd, CRS, the window's affine transform, its footprint in
    the scene CRS and in WGS84 (closed counter-clockwise rings) and WGS84 bounds
    ``[west, south, east, north]``. Each scene is opened once."""
    out: list[dict[str, Any] | None] = [None] * len(refs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, ref in enumerate(refs):
        groups.setdefault((ref.scene, ref.gsd), []).append(i)
    for (path, gsd), idx in groups.items():
        with Scene(path, gsd=gsd, bands=refs[idx[0]].bands, stretch="none") as scene:
            windows = [refs[i].window for i in idx]
            for w in windows:
                scene._check_window(w)
            native, wgs = scene.footprints(windows)
            for k, i in enumerate(idx):
                lons = [p[0] for p in unwrap(wgs[k])]  # across the antimeridian: west > east (RFC 7946 5.2)
                lats = [p[1] for p in wgs[k]]
                east = max(lons) - 360.0 if max(lons) > 180.0 else max(lons)
                out[i] = {"scene": str(Path(path)), "window": list(windows[k]), "gsd": gsd, "crs": scene.grid.crs,
                          "transform": list(scene.window_transform(windows[k])),
                          "footprint": [list(p) for p in native[k]], "footprint_wgs84": [list(p) for p in wgs[k]],
                          "bounds": [min(lons), min(lats), east, max(lats)]}
    return out  # type: ignore[return-value]


__all__ = ["EARTH_RADIUS", "PERCENTILES", "STATS_SIDE", "WGS84", "Grid", "Ring", "Scene", "Window", "apply_stretch",
           "chip_digest", "chip_geo", "default_bands", "footprints", "open_scene", "probe_chip", "rasterio_module", "read_chip",
           "read_chip_rgb", "resolve", "to_map", "to_pixel"]
