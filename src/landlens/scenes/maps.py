"""Maps of a scene from a sliding window of chips: land-use maps and similarity maps.

:func:`make_map` lays the windows of :func:`~landlens.scenes.tiling.chip_windows` (``chip``
pixels of the chip grid every ``stride`` pixels, the last ones flush with the edges) over a
scene and asks a *scorer* for ``K`` numbers per window (class probabilities of a trained run,
or the similarity of each chip to a query); windows in which less than ``min_valid`` of the
pixels hold data are not scored.

**Cells.** The map has one pixel (a *cell*) per ``stride`` x ``stride`` pixels of the chip
grid, aligned with its top-left corner (the last row and column of cells may reach past the
scene's edge). A cell's value is the mean of the scores of the scored windows that contain the
centre of the cell's part of the scene: with ``stride == chip`` each cell is one window; with
``stride = chip / 2`` each inner cell averages four overlapping windows. A cell is nodata when
no scored window contains it, or when less than half of its own pixels hold data (its mask is
read), so a scene's nodata edge stays nodata in the map.

**Memory and resuming.** Windows are read one at a time (never the whole scene) and scored in
batches; each window's scores go to row ``i`` of a memory-mapped array in a work folder beside
the output (``OUT.partial/``, with ``state.json`` counting the windows done), flushed after
every batch. An interrupted map started again with the same scene, settings and scorer resumes
at the first window not done and ends with the same numbers (a window scored twice writes the
same row); other settings are refused until ``restart=True``. The cells are then assembled one
row at a time (memory: ``K`` x the width of one cell row) and written as a GeoTIFF (deflate)
with the scene's CRS and the cells' transform, renamed into place atomically; the work folder
is removed last.

**Outputs.** ``kind='classes'``: one ``uint8`` band of class indices (nodata 255) with a colour
table, the class names in the file's tags (``landlens_classes``) and in a GDAL side file
(``OUT.aux.xml``, category names QGIS and ``gdalinfo`` show), and a CSV class table
(``OUT.csv``: value, class, colour, cells, share); ``probabilities=PATH`` also writes the
``K`` mean probabilities (``float32``, nodata NaN). ``kind='values'``: one ``float32`` band
(nodata NaN). Both get a PNG preview (``OUT.png``): the scene, the map, and a legend.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from landlens.atomic import atomic_path, atomic_write_json, atomic_write_text
from landlens.errors import LandlensError
from landlens.scenes.preview import (
    NODATA_RGB,
    PREVIEW_SIDE,
    class_colours,
    render_preview,
    value_colours,
)
from landlens.scenes.reader import PERCENTILES, Grid, Scene, Window, rasterio_module
from landlens.scenes.refs import Stretch
from landlens.scenes.tiling import DEFAULT_MIN_VALID, check_min_valid, scene_windows

NODATA_CLASS = 255
"""The class value of nodata cells in a class map."""

CELL_MIN_VALID = 0.5
"""A cell whose own pixels hold data in a smaller share is nodata."""



class ChipScorer(Protocol):
    """What a map asks of a model: ``outputs`` numbers per chip, and an ``identity`` string that
    changes whenever the scores would (a weights digest, a query vector digest); it keys resuming."""

    identity: str
    outputs: int

    def __call__(self, chips: list[np.ndarray]) -> np.ndarray:
        """Scores ``(len(chips), outputs)`` of ``(H, W, 3)`` uint8 RGB chips."""
        ...


@dataclass(frozen=True)
class CellGrid:
    """The map's grid: ``width`` x ``height`` cells of ``cell`` chip-grid pixels, with the scene's
    CRS and the cells' own affine transform."""

    width: int
    height: int
    cell: int
    transform: tuple[float, float, float, float, float, float]
    crs: str
    scene_width: int
    scene_height: int

    @classmethod
    def of(cls, grid: Grid, cell: int) -> "CellGrid":
        a, b, c, d, e, f = grid.transform
        return cls(math.ceil(grid.width / cell), math.ceil(grid.height / cell), int(cell),
                   (a * cell, b * cell, c, d * cell, e * cell, f), grid.crs, grid.width, grid.height)

    def centres(self, axis: int) -> np.ndarray:
        """Chip-grid coordinates of the centres of each cell's part of the scene along ``axis``
        (0: columns, 1: rows)."""
        n, size = (self.width, self.scene_width) if axis == 0 else (self.height, self.scene_height)
        lo = np.arange(n, dtype=np.float64) * self.cell
        return (lo + np.minimum(lo + self.cell, size)) / 2.0


@dataclass
class MapResult:
    """What :func:`make_map` wrote and measured."""

    out: str
    preview: str | None
    kind: str
    scene: dict[str, Any]
    chip: int
    stride: int
    cells: tuple[int, int]
    windows: int
    scored: int
    skipped: int
    resumed_at: int
    seconds: float
    nodata_cells: int
    classes: list[dict[str, Any]] = field(default_factory=list)
    value_range: tuple[float, float] | None = None
    probabilities: str | None = None
    table: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- scoring windows


def _workdir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _key(scene: Scene, windows: Sequence[Window], scorer: ChipScorer, settings: dict[str, Any]) -> str:
    st = os.stat(scene.path)
    doc = {"scene": scene.describe(), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "settings": settings,
           "scorer": scorer.identity, "outputs": int(scorer.outputs), "windows": len(windows)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _open_scores(work: Path, key: str, n: int, k: int, restart: bool) -> tuple[np.ndarray, int]:
    """The memory-mapped window scores and the count of windows done (resuming when the state
    matches ``key``)."""
    state_file = work / "state.json"
    if work.exists() and not restart:
        try:
            state = json.loads(state_file.read_text())
            scores = np.load(work / "scores.npy", mmap_mode="r+")
        except (OSError, ValueError) as exc:
            raise LandlensError(f"{work}: an unfinished map that cannot be read ({exc}); remove it or restart") from None
        if state.get("key") != key or scores.shape != (n, k):
            raise LandlensError(f"{work} holds an unfinished map of another scene, setting or model; "
                                f"remove it or restart (--restart) to discard it")
        return scores, int(state.get("done", 0))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    scores = np.lib.format.open_memmap(work / "scores.npy", mode="w+", dtype=np.float32, shape=(n, k))
    scores[:] = np.nan
    scores.flush()
    atomic_write_json(work / "state.json", {"key": key, "done": 0, "windows": n, "outputs": k})
    return scores, 0


def score_windows(scene: Scene, windows: Sequence[Window], scorer: ChipScorer, scores: np.ndarray, *,
                  start: int, work: Path, key: str, batch_size: int, min_valid: float,
                  progress: bool = False) -> int:
    """Score windows ``start:`` into rows of ``scores`` (NaN for windows with too little data),
    recording progress in ``work`` after each batch. Returns how many windows were scored."""
    it: Any = range(start, len(windows))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(windows), initial=start, desc=f"mapping {os.path.basename(scene.path)}",
                  unit="chip", file=sys.stderr)
    scored = 0
    batch: list[np.ndarray] = []
    rows: list[int] = []

    def flush(done: int) -> None:
        nonlocal scored
        if batch:
            out = np.asarray(scorer(batch), dtype=np.float32)
            if out.shape != (len(batch), scores.shape[1]):
                raise LandlensError(f"the scorer gave shape {out.shape} for {len(batch)} chips "
                                    f"and {scores.shape[1]} outputs")
            scores[rows] = out
            scored += len(batch)
            batch.clear()
            rows.clear()
        scores.flush()
        atomic_write_json(work / "state.json", {"key": key, "done": done, "windows": len(windows),
                                                "outputs": int(scores.shape[1])})

    for i in it:
        data, valid = scene.read(windows[i])
        share = float(valid.mean())
        if share >= min_valid and share > 0:
            batch.append(scene.to_rgb(data, valid))
            rows.append(i)
        if len(batch) >= batch_size:
            flush(i + 1)
    flush(len(windows))
    return scored


# --------------------------------------------------------------------------- cells


def cell_rows(scene: Scene, cells: CellGrid, windows: Sequence[Window], scores: np.ndarray,
              ) -> Iterator[tuple[int, np.ndarray]]:
    """``(row, values)`` per cell row, top to bottom: ``values`` ``(K, width)`` float32, the
    mean score of the scored windows containing each cell's centre, NaN for nodata cells."""
    chip = int(windows[0][2]) if windows else 0
    cx, cy = cells.centres(0), cells.centres(1)
    by_row: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_row.setdefault(int(w[1]), []).append(i)
    row_offsets = np.array(sorted(by_row), dtype=np.float64)
    k = scores.shape[1]
    for j in range(cells.height):
        total = np.zeros((k, cells.width), np.float64)
        count = np.zeros(cells.width, np.float64)
        for r in row_offsets[(row_offsets <= cy[j]) & (cy[j] < row_offsets + chip)]:
            idx = by_row[int(r)]
            cols = np.array([windows[i][0] for i in idx], np.float64)
            s = np.asarray(scores[idx], np.float64)
            scored = np.isfinite(s).all(1)
            cover = ((cols[:, None] <= cx[None, :]) & (cx[None, :] < cols[:, None] + chip)) & scored[:, None]
            total += np.nan_to_num(s).T @ cover
            count += cover.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = (total / count).astype(np.float32)
        values[:, count == 0] = np.nan
        values[:, _cell_valid(scene, cells, j) < CELL_MIN_VALID] = np.nan
        yield j, values


def _cell_valid(scene: Scene, cells: CellGrid, j: int) -> np.ndarray:
    """The share of each cell of cell row ``j`` whose pixels hold data (one read of the mask rows)."""
    y0 = j * cells.cell
    h = min(cells.cell, cells.scene_height - y0)
    mask = scene.valid_mask((0, y0, cells.scene_width, h)).astype(np.float32)
    pad = cells.width * cells.cell - cells.scene_width
    summed = np.pad(mask.sum(0), (0, pad)).reshape(cells.width, cells.cell).sum(1)
    widths = np.minimum(cells.cell, cells.scene_width - np.arange(cells.width) * cells.cell)
    return summed / (widths * h)


# --------------------------------------------------------------------------- previews


def _map_overview(tif: Path, cells: CellGrid, shape: tuple[int, int]) -> np.ndarray:
    """The map's first band at the scene overview's pixel size (nearest), cropped to the scene."""
    rasterio = rasterio_module()
    from rasterio.enums import Resampling

    h, w = shape
    full_w = max(1, round(w * cells.width * cells.cell / cells.scene_width))
    full_h = max(1, round(h * cells.height * cells.cell / cells.scene_height))
    with rasterio.open(tif) as src:
        band = src.read(1, out_shape=(full_h, full_w), resampling=Resampling.nearest)
    return band[:h, :w]


# --------------------------------------------------------------------------- writing


def _profile(cells: CellGrid, count: int, dtype: str, nodata: float) -> dict[str, Any]:
    from affine import Affine

    return {"driver": "GTiff", "width": cells.width, "height": cells.height, "count": count, "dtype": dtype,
            "crs": cells.crs, "transform": Affine(*cells.transform), "nodata": nodata, "compress": "deflate"}


def _aux_xml(classes: Sequence[str]) -> str:
    from xml.sax.saxutils import escape

    cats = "".join(f"<Category>{escape(c)}</Category>" for c in classes)
    return (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>{cats}</CategoryNames>\n'
            f"  </PAMRasterBand>\n</PAMDataset>\n")


def write_class_map(out: Path, cells: CellGrid, rows: Iterator[tuple[int, np.ndarray]], classes: Sequence[str],
                    probabilities: Path | None = None) -> np.ndarray:
    """Write the class map (and the probabilities) row by row; returns cells per class, then
    nodata cells last."""
    rasterio = rasterio_module()
    from rasterio.windows import Window as RWindow

    counts = np.zeros(len(classes) + 1, np.int64)
    colours = class_colours(len(classes))
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out))
        dst = stack.enter_context(rasterio.open(tmp, "w", **_profile(cells, 1, "uint8", NODATA_CLASS)))
        prob = None
        if probabilities is not None:
            ptmp = stack.enter_context(atomic_path(probabilities))
            prob = stack.enter_context(rasterio.open(ptmp, "w", **_profile(cells, len(classes), "float32", float("nan"))))
            for i, name in enumerate(classes):
                prob.set_band_description(i + 1, name)
        for j, values in rows:
            nodata = ~np.isfinite(values).all(0)
            labels = np.where(nodata, NODATA_CLASS, np.nan_to_num(values, nan=-1).argmax(0)).astype(np.uint8)
            counts += np.bincount(np.where(nodata, len(classes), labels), minlength=len(classes) + 1)
            dst.write(labels[None, None, :], window=RWindow(0, j, cells.width, 1))
            if prob is not None:
                prob.write(values[:, None, :], window=RWindow(0, j, cells.width, 1))
        dst.write_colormap(1, {**{i: (*c, 255) for i, c in enumerate(colours)}, NODATA_CLASS: (0, 0, 0, 0)})
        dst.set_band_description(1, "class")
        dst.update_tags(landlens_classes=json.dumps(list(classes)))
        dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(classes)})
    atomic_write_text(out.with_name(out.name + ".aux.xml"), _aux_xml(classes))
    return counts


def write_value_map(out: Path, cells: CellGrid, rows: Iterator[tuple[int, np.ndarray]], name: str) -> tuple[float, float, int]:
    """Write a one-band float32 map row by row; returns its (min, max) and its nodata cell count."""
    rasterio = rasterio_module()
    from rasterio.windows import Window as RWindow

    lo, hi, missing = math.inf, -math.inf, 0
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **_profile(cells, 1, "float32", float("nan"))) as dst:
        dst.set_band_description(1, name)
        for j, values in rows:
            v = values[0]
            ok = np.isfinite(v)
            missing += int((~ok).sum())
            if ok.any():
                lo, hi = min(lo, float(v[ok].min())), max(hi, float(v[ok].max()))
            dst.write(v[None, None, :], window=RWindow(0, j, cells.width, 1))
    return lo, hi, missing


# --------------------------------------------------------------------------- the whole map


def make_map(scene_path: str | os.PathLike[str], scorer: ChipScorer, out: str | os.PathLike[str], *,
             kind: str = "classes", classes: Sequence[str] | None = None, value_name: str = "similarity",
             chip: int = 256, stride: int | None = None, gsd: float | None = None, bands: Sequence[int] | None = None,
             nodata: float | None = None, stretch: str | Stretch = "auto",
             percentiles: tuple[float, float] = PERCENTILES, resampling: str | None = None,
             min_valid: float = DEFAULT_MIN_VALID, batch_size: int = 32, probabilities: str | os.PathLike[str] | None = None,
             preview: bool = True, legend_extra: Sequence[tuple[Any, str]] = (), restart: bool = False,
             progress: bool = False) -> MapResult:
    """Map ``scorer`` over the scene at ``scene_path`` (module docstring) into the GeoTIFF ``out``.

    Scene settings (``gsd``, ``bands``, ``nodata``, ``stretch``, ``percentiles``, ``resampling``)
    are those of :class:`~landlens.scenes.reader.Scene`; ``stride`` defaults to ``chip`` and is the
    map's cell size. ``kind='classes'`` needs ``classes`` (one per scorer output); ``'values'``
    maps a one-output scorer. ``legend_extra`` rows go under the preview's legend.

    Raises:
        ImageReadError: the scene cannot be read.
        LandlensError: bad settings, a scene smaller than one chip, no window with enough data,
            or an unfinished map of other settings in ``OUT.partial`` (without ``restart``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if kind not in ("classes", "values"):
        raise LandlensError(f"unknown map kind {kind!r}: classes or values")
    if kind == "classes" and (classes is None or len(classes) != scorer.outputs):
        raise LandlensError(f"a class map needs one class name per output ({scorer.outputs})")
    if kind == "values" and scorer.outputs != 1:
        raise LandlensError("a value map needs a scorer with one output")
    if kind == "classes" and len(classes or ()) > NODATA_CLASS:
        raise LandlensError(f"a class map holds at most {NODATA_CLASS} classes")
    if int(batch_size) < 1:
        raise LandlensError(f"batch size {batch_size}: must be at least 1")
    check_min_valid(min_valid)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise LandlensError(f"{out}: the map is a GeoTIFF; name it .tif")
    stride = int(chip) if stride is None else int(stride)
    with Scene(scene_path, bands=bands, gsd=gsd, resampling=resampling, stretch=stretch, percentiles=percentiles,
               nodata=nodata) as scene:
        windows = scene_windows(scene, chip, stride)
        settings = {"chip": int(chip), "stride": stride, "min_valid": float(min_valid)}
        key = _key(scene, windows, scorer, settings)
        work = _workdir(out)
        scores, start = _open_scores(work, key, len(windows), int(scorer.outputs), restart)
        score_windows(scene, windows, scorer, scores, start=start, work=work, key=key, batch_size=int(batch_size),
                      min_valid=float(min_valid), progress=progress)
        scored = int(np.isfinite(scores).all(1).sum())
        if scored == 0:
            raise LandlensError(f"{scene_path}: no window of {chip} pixels has {min_valid:.0%} of its pixels with data")
        cells = CellGrid.of(scene.grid, stride)
        rows = cell_rows(scene, cells, windows, scores)
        result = MapResult(str(out), None, kind, scene.describe(), int(chip), stride, (cells.width, cells.height),
                           len(windows), scored, len(windows) - scored, start, 0.0, 0)
        if kind == "classes":
            prob = Path(probabilities) if probabilities is not None else None
            counts = write_class_map(out, cells, rows, list(classes or ()), prob)
            result.nodata_cells = int(counts[-1])
            total = max(1, int(counts[:-1].sum()))
            colours = class_colours(len(classes or ()))
            result.classes = [{"value": i, "class": name, "colour": list(colours[i]), "cells": int(counts[i]),
                               "share": round(int(counts[i]) / total, 6)} for i, name in enumerate(classes or ())]
            result.probabilities = str(prob) if prob is not None else None
            result.table = str(_write_table(out, result.classes))
        else:
            lo, hi, missing = write_value_map(out, cells, rows, value_name)
            result.nodata_cells = missing
            result.value_range = (lo, hi)
        if preview:
            result.preview = str(_preview(scene, out, cells, result, legend_extra))
    del scores
    shutil.rmtree(work, ignore_errors=True)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _write_table(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    import csv
    import io

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["value", "class", "colour", "cells", "share"])
    for r in rows:
        w.writerow([r["value"], r["class"], "#%02x%02x%02x" % tuple(r["colour"]), r["cells"], r["share"]])
    path = out.with_suffix(".csv")
    atomic_write_text(path, text.getvalue())
    return path


def _preview(scene: Scene, out: Path, cells: CellGrid, result: MapResult, extra: Sequence[tuple[Any, str]]) -> Path:
    rgb = scene.overview(PREVIEW_SIDE)
    band = _map_overview(out, cells, rgb.shape[:2])
    name = os.path.basename(scene.path)
    if result.kind == "classes":
        lut = np.array([*(c["colour"] for c in result.classes)] + [NODATA_RGB] * (256 - len(result.classes)), np.uint8)
        map_rgb = lut[band]
        legend: list[tuple[Any, str]] = [(c["colour"], f"{c['class']}  {100 * c['share']:.1f} %") for c in result.classes]
        title = f"{name}: land use ({result.chip}-px chips every {result.stride} px)"
    else:
        lo, hi = result.value_range or (0.0, 1.0)
        map_rgb = value_colours(band, lo, hi)
        bar = value_colours(np.linspace(hi, lo, 160)[:, None].repeat(18, 1), lo, hi)
        legend = [(bar, f"{hi:.3f} most similar\n{lo:.3f}")]
        title = f"{name}: similarity to the query ({result.chip}-px chips every {result.stride} px)"
    return render_preview(out.with_suffix(".png"), rgb, map_rgb, [*legend, *extra], title)


__all__ = ["CELL_MIN_VALID", "NODATA_CLASS", "CellGrid", "ChipScorer", "MapResult", "cell_rows", "make_map",
           "score_windows", "write_class_map", "write_value_map"]
