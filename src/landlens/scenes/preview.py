"""PNG previews of maps: class colours, a value colour scale, and the three-panel preview
(the scene, the map, a legend) that :func:`landlens.scenes.maps.make_map` writes beside a map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landlens.atomic import atomic_path

NODATA_RGB = (48, 48, 48)
"""Colour of nodata in previews."""

PREVIEW_SIDE = 512
"""Longest side of each panel of a preview, in pixels."""


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours: matplotlib's tab10 up to 10 classes, tab20 up to 20, else hues."""
    import matplotlib

    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        rgba = [cmap(i) for i in range(n)]
    else:
        cmap = matplotlib.colormaps["hsv"]
        rgba = [cmap(i / n) for i in range(n)]
    return [tuple(int(round(255 * c)) for c in col[:3]) for col in rgba]  # type: ignore[misc]


def value_colours(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(..., 3)`` uint8 viridis colours of ``values`` between ``lo`` and ``hi``; NaN: nodata grey."""
    import matplotlib

    span = hi - lo if hi > lo else 1.0
    rgba = matplotlib.colormaps["viridis"](np.clip((values - lo) / span, 0, 1))
    rgb = (rgba[..., :3] * 255).round().astype(np.uint8)
    rgb[~np.isfinite(values)] = NODATA_RGB
    return rgb


def _panel(rgb: np.ndarray, side: int = PREVIEW_SIDE) -> Any:
    from PIL import Image

    im = Image.fromarray(rgb)
    scale = side / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)


def render_preview(path: Path, scene_rgb: np.ndarray, map_rgb: np.ndarray, legend: Sequence[tuple[Any, str]],
                   title: str) -> Path:
    """A PNG: the scene, the map (same extent and size) and a legend of ``(colour or image, text)``
    rows (an ``(h, w, 3)`` array draws as a swatch image: a colour bar, a query chip)."""
    from PIL import Image, ImageDraw, ImageFont

    left, mid = _panel(scene_rgb), _panel(map_rgb)
    font = ImageFont.load_default(size=14)
    pad, swatch, width = 10, 18, 260
    rows_h = [max(swatch, np.asarray(item).shape[0]) if isinstance(item, np.ndarray) else swatch
              for item, _ in legend]
    height = max(left.height, mid.height, 40 + sum(h + 6 for h in rows_h)) + 2 * pad + 24
    canvas = Image.new("RGB", (left.width + mid.width + width + 4 * pad, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    top = pad + 24
    canvas.paste(left, (pad, top))
    canvas.paste(mid, (2 * pad + left.width, top))
    x, y = 3 * pad + left.width + mid.width, top
    for (item, text), h in zip(legend, rows_h):
        if isinstance(item, np.ndarray):
            canvas.paste(Image.fromarray(item), (x, y))
            tx = x + item.shape[1] + 8
        else:
            draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(item), outline=(0, 0, 0))
            tx = x + swatch + 8
        lines = text.split("\n")
        if len(lines) == 1:
            draw.text((tx, y + max(0, h // 2 - 8)), text, fill=(0, 0, 0), font=font)
        else:  # first line at the swatch's top, last at its bottom (a colour bar's ends)
            for n, line in enumerate(lines):
                draw.text((tx, y + round(n * (h - 14) / (len(lines) - 1))), line, fill=(0, 0, 0), font=font)
        y += h + 6
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


__all__ = ["NODATA_RGB", "PREVIEW_SIDE", "class_colours", "render_preview", "value_colours"]
