"""GeoJSON (RFC 7946) documents of chips: WGS84 polygons in longitude, latitude order.

Rings come from :func:`landlens.scenes.reader.footprints` already closed and counter-clockwise
(the right-hand rule of RFC 7946 section 3.1.6); coordinates are written at full precision, so a
polygon's corners are the pixel corners exactly. A feature without a location (an image file in
an archive that also holds chips) has ``"geometry": null``, as the RFC allows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from landlens.atomic import atomic_write_text


def polygon(ring: Sequence[Sequence[float]]) -> dict[str, Any]:
    """A GeoJSON Polygon of one closed exterior ring of ``[lon, lat]`` positions."""
    return {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in ring]]}


def feature(geometry: dict[str, Any] | None, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def feature_collection(features: Sequence[dict[str, Any]], **members: Any) -> dict[str, Any]:
    """A FeatureCollection; ``members`` are extra top-level members (RFC 7946 section 6.1)."""
    return {"type": "FeatureCollection", **members, "features": list(features)}


def dumps(doc: dict[str, Any]) -> str:
    """``doc`` as JSON text; a FeatureCollection with one feature per line."""
    if doc.get("type") != "FeatureCollection":
        return json.dumps(doc, ensure_ascii=False) + "\n"
    head = {k: v for k, v in doc.items() if k != "features"}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "features": [']
    feats = doc.get("features") or []
    lines += [json.dumps(f, ensure_ascii=False) + ("," if i + 1 < len(feats) else "") for i, f in enumerate(feats)]
    return "\n".join(lines) + "\n]}\n"


def write_geojson(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write ``doc`` as UTF-8 JSON (:func:`dumps`), atomically."""
    atomic_write_text(path, dumps(doc))


__all__ = ["dumps", "feature", "feature_collection", "polygon", "write_geojson"]
