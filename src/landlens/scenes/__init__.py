"""Whole georeferenced scenes: reading by windows, tiling into chips, georeferenced outputs.

* :mod:`~landlens.scenes.refs`: a chip is named by a reference string,
  ``SCENE.tif#window=COL,ROW,W,H&bands=...&gsd=...&stretch=...``, which every image reader of
  landlens decodes (:func:`landlens.data.io.load_rgb`, hence the one decode path
  :func:`landlens.models.preprocessing.decode_image`);
* :mod:`~landlens.scenes.reader`: :class:`Scene`, bands, nodata, resampling to a ground sampling
  distance, the radiometric mapping to 8-bit RGB, footprints in the scene CRS and in WGS84;
* :mod:`~landlens.scenes.tiling`: :func:`tile_scene`, chip windows, chips without data skipped;
* :mod:`~landlens.scenes.geojson`: RFC 7946 documents.

The package sits below ``data`` in landlens's layers (it imports only ``errors``, ``atomic`` and
``hashing``), so the image readers can call it; archives built from scenes, searches by
location and GeoJSON of search results live in :mod:`landlens.retrieval.geo`. rasterio is
needed to read scenes (``pip install 'landlens[scenes]'``) and is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChipRef": "landlens.scenes.refs",
    "parse_chip_ref": "landlens.scenes.refs",
    "Scene": "landlens.scenes.reader",
    "open_scene": "landlens.scenes.reader",
    "chip_windows": "landlens.scenes.tiling",
    "tile_scene": "landlens.scenes.tiling",
    "Chip": "landlens.scenes.tiling",
    "SceneTiles": "landlens.scenes.tiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'landlens.scenes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
