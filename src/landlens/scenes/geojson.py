"""GeoJSON (RFC 7946) documents of chips: WGS84 polygons in longitude, latitude order.

Rings come from :func:`landlens.scenes.reader.footprints` already closed and counter-clockwise
(the right-hand rule of RFC 7946 section 3.1.6); coordinates are written at full precision, so a
polygon's corners are the pixel corners exactly. A feature without a location (an image file in
an archive that also holds chips) has ``"geometry": null``, as the RFC allows.

A footprint that crosses the antimeridian (its longitudes jump by more than 180 degrees) is cut
there into a MultiPolygon of one part east and one part west of it (RFC 7946 section 3.1.9):
the ring is unwrapped to continuous longitudes, clipped against the half-planes ``lon <= 180``
and ``lon >= 180`` (Sutherland-Hodgman), and the western part shifted back by -360 degrees.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from landlens.atomic import atomic_write_text


Position = tuple[float, float]


def crosses_antimeridian(ring: Sequence[Sequence[float]]) -> bool:
    """Whether a WGS84 ring's longitudes jump across the antimeridian (span more than 180 degrees)."""
    lons = [float(p[0]) for p in ring]
    return bool(lons) and max(lons) - min(lons) > 180.0


def unwrap(ring: Sequence[Sequence[float]]) -> list[Position]:
    """The ring with continuous longitudes: negative ones + 360 when it crosses the antimeridian."""
    cross = crosses_antimeridian(ring)
    return [(float(x) + 360.0 if cross and float(x) < 0 else float(x), float(y)) for x, y in ring]


def _clip(ring: list[Position], keep_east: bool) -> list[Position]:
    """Sutherland-Hodgman clip of a closed ring to ``lon >= 180`` (``keep_east``) or ``lon <= 180``."""
    def inside(p: Position) -> bool:
        return p[0] >= 180.0 if keep_east else p[0] <= 180.0

    out: list[Position] = []
    for p, q in zip(ring, ring[1:]):
        if inside(p) != inside(q):
            t = (180.0 - p[0]) / (q[0] - p[0])
            out.append((180.0, p[1] + t * (q[1] - p[1])))
        if inside(q):
            out.append(q)
    if out and out[0] != out[-1]:
        out.append(out[0])
    return out


def split_antimeridian(ring: Sequence[Sequence[float]]) -> list[list[Position]]:
    """A closed WGS84 ring as the closed rings of its parts east and west of the antimeridian
    (module docstring); a ring that does not cross it comes back whole."""
    if not crosses_antimeridian(ring):
        return [[(float(x), float(y)) for x, y in ring]]
    u = unwrap(ring)
    east = _clip(u, keep_east=False)  # 0..180: the part east of Greenwich, west of the antimeridian
    west = [(x - 360.0, y) for x, y in _clip(u, keep_east=True)]
    return [part for part in (east, west) if len(part) >= 4]


def polygon(ring: Sequence[Sequence[float]]) -> dict[str, Any]:
    """A GeoJSON Polygon of one closed exterior ring of ``[lon, lat]`` positions, or a
    MultiPolygon of its two parts when it crosses the antimeridian."""
    parts = split_antimeridian(ring)
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": [[[x, y] for x, y in parts[0]]]}
    return {"type": "MultiPolygon", "coordinates": [[[[x, y] for x, y in part]] for part in parts]}


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


__all__ = ["crosses_antimeridian", "dumps", "feature", "feature_collection", "polygon", "split_antimeridian",
           "unwrap", "write_geojson"]
