"""Report figures: confusion matrices, learning curves and image grids, written as PNG files.

Plots use matplotlib's object-oriented API with the Agg canvas (``matplotlib.figure.Figure``
+ ``FigureCanvasAgg``): no pyplot state, no display, safe in worker threads and on headless
machines. Image grids are composed pixel-exactly with NumPy and Pillow, so their size is
known in advance (see :func:`save_image_grid`). Every file is written atomically: rendered in
memory, written to a temporary file in the target folder, then renamed over the target
(``os.replace``), so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from landlens.atomic import atomic_write_bytes

GRID_PAD = 2
"""Pixels of white space around and between the cells of :func:`save_image_grid`."""

GRID_TITLE_PX = 12
"""Height in pixels of the caption band above each cell when titles are given."""

ANNOTATE_MAX_CLASSES = 30
"""Confusion matrices with at most this many classes get a value written in each cell."""


def _save_figure(fig: Any, out_png: str | os.PathLike[str], dpi: int = 100) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out = Path(out_png)
    atomic_write_bytes(out, buf.getvalue())
    return out


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its sum (the per-class recall view); rows
    that sum to zero (a class absent from the evaluated set) stay all-zero, without NaN."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def plot_confusion_matrix(
    cm: np.ndarray,
    classes: Sequence[str],
    out_png: str | os.PathLike[str],
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Plot a confusion matrix (rows: true class, columns: predicted class) to a PNG.

    With ``normalize`` each row is divided by its sum (:func:`row_normalize`; empty rows stay
    zero) and the colour scale is fixed to [0, 1]. Values are written in the cells when there
    are at most :data:`ANNOTATE_MAX_CLASSES` classes; the figure and label font grow and shrink
    with the number of classes so that 45 classes (NWPU-RESISC45) stay readable.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    n = len(classes)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if cm.shape[0] != n:
        raise ValueError(f"confusion matrix is {cm.shape[0]}x{cm.shape[1]} but {n} class names were given")
    values = row_normalize(cm) if normalize else cm.astype(np.float64)
    vmax = 1.0 if normalize else max(float(values.max(initial=0.0)), 1.0)

    side = min(26.0, max(5.0, 0.32 * n + 3.0))
    pitch_pt = side * 0.75 / max(n, 1) * 72.0  # approximate row height in points
    label_fs = max(4.0, min(9.0, 0.6 * pitch_pt))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=[str(c) for c in classes], fontsize=label_fs, rotation=90)
    ax.set_yticks(ticks, labels=[str(c) for c in classes], fontsize=label_fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title is None:
        title = "Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"
    ax.set_title(title)
    if n <= ANNOTATE_MAX_CLASSES:
        cell_fs = max(5.0, min(9.0, 140.0 / max(n, 1)))
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                text = f"{v:.2f}" if normalize else f"{int(round(v))}"
                if normalize and v == 0:
                    text = "0"
                ax.text(j, i, text, ha="center", va="center", fontsize=cell_fs,
                        color="white" if v > 0.5 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return _save_figure(fig, out_png)


def _history_columns(history: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    if isinstance(history, Mapping):
        cols = {str(k): list(v) for k, v in history.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"history columns have different lengths: {lengths}")
        return cols
    keys: list[str] = []
    for row in history:
        for k in row:
            if k not in keys:
                keys.append(str(k))
    return {k: [row.get(k) for row in history] for k in keys}


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def plot_learning_curves(
    history: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Plot training curves to a PNG: a loss panel, an accuracy panel and, when present, a
    learning-rate panel (log scale).

    ``history`` is a list of per-epoch dicts or a dict of equal-length lists. The x axis is the
    ``epoch`` column when present, else 1, 2, ...; columns whose name contains ``loss`` go to
    the loss panel, ``acc`` to the accuracy panel, and ``lr`` (or ``lr*``) to the learning-rate
    panel. Missing columns are skipped, as are missing/None/NaN values within a column
    (validation that ran only every few epochs); a panel with no column is left out.

    Raises:
        ValueError: ``history`` has no loss, accuracy or learning-rate column.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = _history_columns(history)
    n = max((len(v) for v in cols.values()), default=0)
    epochs = np.array([_as_float(v) for v in cols.get("epoch", [])], dtype=np.float64)
    x = epochs if len(epochs) == n and n and not np.isnan(epochs).any() else np.arange(1, n + 1, dtype=np.float64)
    panels: list[tuple[str, list[str], bool]] = []
    loss_keys = [k for k in cols if "loss" in k.lower()]
    acc_keys = [k for k in cols if "acc" in k.lower() and k not in loss_keys]
    lr_keys = [k for k in cols if k.lower() == "lr" or k.lower().startswith("lr_") or k.lower().startswith("lr/")]
    if loss_keys:
        panels.append(("loss", loss_keys, False))
    if acc_keys:
        panels.append(("accuracy", acc_keys, False))
    if lr_keys:
        panels.append(("learning rate", lr_keys, True))
    if not panels or n == 0:
        raise ValueError(f"history has no loss, accuracy or lr values (columns: {sorted(cols)})")

    fig = Figure(figsize=(4.8 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, keys, log) in zip(axes, panels):
        for k in keys:
            y = np.array([_as_float(v) for v in cols[k]], dtype=np.float64)
            ok = np.isfinite(y)
            if log:
                ok &= y > 0
            if not ok.any():
                continue
            style = "--" if k.lower().startswith("val") else "-"
            ax.plot(x[ok], y[ok], style, marker="o" if ok.sum() <= 30 else None, markersize=3,
                    label=k.replace("_", " "))
        if log and ax.lines:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out_png)


def _fit(img: Image.Image, cell_h: int, cell_w: int) -> Image.Image:
    """Resize to fit in the cell, keeping the aspect ratio: nearest when enlarging (feature maps
    stay blocky and honest), Lanczos when shrinking."""
    w, h = img.size
    scale = min(cell_w / w, cell_h / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) == (w, h):
        return img
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return img.resize((nw, nh), resample)


def grid_size(n_images: int, ncols: int, cell_h: int, cell_w: int, titles: bool = False) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that :func:`save_image_grid` writes."""
    ncols = max(1, min(ncols, n_images))
    nrows = math.ceil(n_images / ncols)
    band = GRID_TITLE_PX if titles else 0
    return ncols * cell_w + (ncols + 1) * GRID_PAD, nrows * (cell_h + band) + (nrows + 1) * GRID_PAD


def save_image_grid(
    images: Sequence[np.ndarray],
    out_png: str | os.PathLike[str],
    *,
    ncols: int,
    titles: Sequence[str] | None = None,
    cell_px: int | None = None,
) -> Path:
    """Write images (``H x W x 3`` or ``H x W`` uint8 arrays) as one PNG grid, row by row.

    Cells are ``cell_px`` square when given (each image fitted inside, aspect kept, centred),
    else as large as the largest image. Cells are separated and surrounded by
    :data:`GRID_PAD` white pixels, and with ``titles`` (one per image) each cell has a
    :data:`GRID_TITLE_PX` caption band above it; the size is :func:`grid_size`. The output
    depends only on the inputs (identical arrays give identical PNG bytes).
    """
    if not images:
        raise ValueError("no images for the grid")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    pils: list[Image.Image] = []
    for i, a in enumerate(images):
        a = np.asarray(a)
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
            raise ValueError(f"image {i}: expected an HxWx3 or HxW uint8 array, got {a.dtype} {a.shape}")
        pils.append(Image.fromarray(a).convert("RGB"))
    if cell_px is not None:
        cell_h = cell_w = int(cell_px)
        pils = [_fit(p, cell_h, cell_w) for p in pils]
    else:
        cell_h = max(p.size[1] for p in pils)
        cell_w = max(p.size[0] for p in pils)
    ncols = min(ncols, len(pils))
    width, height = grid_size(len(pils), ncols, cell_h, cell_w, titles is not None)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    band = GRID_TITLE_PX if titles is not None else 0
    for i, p in enumerate(pils):
        r, c = divmod(i, ncols)
        x0 = GRID_PAD + c * (cell_w + GRID_PAD)
        y0 = GRID_PAD + r * (cell_h + band + GRID_PAD)
        if titles is not None:
            text = str(titles[i])
            while text and draw.textlength(text, font=font) > cell_w:
                text = text[:-1]
            draw.text((x0, y0), text, fill=(0, 0, 0), font=font)
        w, h = p.size
        canvas.paste(p, (x0 + (cell_w - w) // 2, y0 + band + (cell_h - h) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    out = Path(out_png)
    atomic_write_bytes(out, buf.getvalue())
    return out


__all__ = [
    "ANNOTATE_MAX_CLASSES",
    "GRID_PAD",
    "GRID_TITLE_PX",
    "grid_size",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "row_normalize",
    "save_image_grid",
]
