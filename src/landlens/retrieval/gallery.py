"""Search galleries: each query image followed by its top-k hits, as one PNG.

One row per query: the query thumbnail first (framed blue, its class under it when known; for
a search by words, its sentence, written over the image it was combined with if any), then the hits in rank order with their rank, distance and class. When the query's class is
known (the query is an image of the indexed archive, or the caller named its class), hits of
the same class are framed green and the others red; otherwise hits are framed grey. A hit
whose image cannot be read any more is drawn as a grey tile marked "unreadable".

Drawn with matplotlib's Agg canvas (no display, no global pyplot state) at a fixed cell size,
so a gallery of R queries and k hits is exactly ``(k + 1) * CELL_W_PX`` by ``R * CELL_H_PX``
pixels (:func:`gallery_size`). The PNG is rendered in memory and written with a temporary
file and a rename, so an interrupted run never leaves a partial image.
"""

from __future__ import annotations

import io
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from landlens.errors import LandlensError
from landlens.atomic import atomic_write_bytes
from landlens.retrieval.search import SearchResult

CELL_W_PX = 160
"""Width of one gallery cell (thumbnail plus margins) in pixels."""
CELL_H_PX = 196
"""Height of one gallery cell (title, thumbnail, class name) in pixels."""
DPI = 100
THUMB_PX = 128
"""Thumbnails are resized to this square size before drawing."""

QUERY_COLOUR = "#1f5fbf"
HIT_COLOUR = "#1a9641"
MISS_COLOUR = "#d7191c"
UNKNOWN_COLOUR = "#888888"


def gallery_size(n_queries: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of the gallery of ``n_queries`` rows of ``k`` hits."""
    return (k + 1) * CELL_W_PX, n_queries * CELL_H_PX


def _thumbnail(path: Path | None, size: int = THUMB_PX) -> np.ndarray | None:
    """An RGB ``size`` x ``size`` thumbnail of an image file, or ``None`` if it cannot be read."""
    if path is None:
        return None
    from PIL import Image

    from landlens.data.io import load_rgb
    from landlens.errors import ImageReadError

    try:
        img = load_rgb(path, draft_size=(size, size))
    except ImageReadError:
        return None
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _short(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def render_gallery(results: Sequence[SearchResult]) -> bytes:
    """PNG bytes of the gallery of ``results`` (hits drawn from their archive files)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise LandlensError("no search results to draw")
    k = max(len(r.hits) for r in results)
    w, h = gallery_size(len(results), k)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    # margins as fractions of one cell: title above, class name below each thumbnail
    fig.subplots_adjust(left=0.1 / (k + 1), right=1 - 0.1 / (k + 1), top=1 - 0.14 / len(results),
                        bottom=0.16 / len(results), wspace=0.25, hspace=0.55)
    axes = fig.subplots(len(results), k + 1, squeeze=False)
    for row, res in enumerate(results):
        words = res.text is not None and not Path(res.query).is_file()
        cells: list[tuple[Path | None, str, str, str]] = [
            (None if words else Path(res.query), "query" if res.text is None else "query + words" if not words else "words",
             res.query_class or ("" if words else "class ?"), QUERY_COLOUR)
        ]
        for hit, rel in zip(res.hits, res.relevant()):
            colour = UNKNOWN_COLOUR if rel is None else (HIT_COLOUR if rel else MISS_COLOUR)
            cells.append((Path(hit.record.path), f"#{hit.rank}  {hit.distance:.3f}", hit.record.class_name or "?",
                          colour))
        for col in range(k + 1):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(cells):
                ax.set_axis_off()
                continue
            path, title, label, colour = cells[col]
            thumb = _thumbnail(path)
            if col == 0 and res.text is not None:  # the sentence, over the image it was combined with
                import textwrap

                ax.imshow(thumb if thumb is not None else np.full((THUMB_PX, THUMB_PX, 3), 245, np.uint8),
                          alpha=0.35 if thumb is not None else 1.0)
                ax.text(THUMB_PX / 2, THUMB_PX / 2, "\n".join(textwrap.wrap(_short(res.text, 90), 18)),
                        ha="center", va="center", fontsize=8)
            elif thumb is None:
                ax.imshow(np.full((THUMB_PX, THUMB_PX, 3), 200, np.uint8))
                ax.text(THUMB_PX / 2, THUMB_PX / 2, "unreadable", ha="center", va="center", fontsize=8)
            else:
                ax.imshow(thumb)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(title, fontsize=8, pad=3)
            ax.set_xlabel(_short(label), fontsize=8, color=colour if col else "black", labelpad=3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def write_gallery(results: Sequence[SearchResult], out: str | Path) -> Path:
    """Draw the gallery of ``results`` (see module docstring) and write it to ``out`` atomically."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise LandlensError(f"{out}: a gallery is written as PNG; give a file name ending in .png")
    data = render_gallery(results)
    atomic_write_bytes(out, data)
    return out


__all__ = ["CELL_H_PX", "CELL_W_PX", "gallery_size", "render_gallery", "write_gallery"]
