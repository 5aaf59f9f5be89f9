"""Archives of georeferenced scenes: tiling scenes into an archive, queries given as a place,
and search results as GeoJSON.

An archive built from scenes (:meth:`~landlens.retrieval.archive.Archive.build_from_scenes`,
``landlens index build SCENE.tif ...``) holds one image per chip; its path is the chip's
reference (:mod:`landlens.scenes.refs`), which every reader decodes by a windowed read, and its
catalog's ``geo`` table (:class:`~landlens.retrieval.generations.GeoRecord`) says where it lies.
Scenes and image files can share one archive; only chips have a location.

* :func:`scene_dataset`: the chips of scenes as a dataset the feature cache extracts;
* :func:`chips_at`: the archive's chips whose window contains a WGS84 point, the one whose
  centre is nearest first (the point is taken to each scene's CRS and tested against each
  window's pixel bounds, so the test is exact on the pixel grid);
* :func:`query_at`: a query for a place: the chip of the archive containing it, or (no chip
  holds it, or ``scene`` is given) a chip of the archive's chip size centred on the point, cut
  from the archive scene containing it (read with that scene's recorded settings) or from
  ``scene``;
* :func:`results_geojson`: search results as an RFC 7946 FeatureCollection.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landlens.errors import ImageReadError, LandlensError
from landlens.retrieval.generations import ArchiveError, GeoRecord, ImageRecord

DEFAULT_TILING: dict[str, Any] = {"chip": 256, "stride": None, "gsd": None, "bands": None, "nodata": None,
                                  "stretch": "auto", "resampling": None, "min_valid": 0.5}
"""Tiling settings of :func:`landlens.scenes.tiling.tile_scene` that an archive records."""


def tile_scenes(scenes: Sequence[str | os.PathLike[str]], *, progress: bool = False, **tiling: Any) -> list[Any]:
    """:class:`~landlens.scenes.tiling.SceneTiles` of each scene (absolute paths), settings as
    :data:`DEFAULT_TILING`.

    Raises:
        ImageReadError: a scene that is missing or unreadable, or without a CRS.
        LandlensError: no scene given, or no chip anywhere with enough data.
    """
    from landlens.data.io import file_problem
    from landlens.scenes.tiling import tile_scene

    if not scenes:
        raise LandlensError("no scene given")
    settings = {**DEFAULT_TILING, **tiling}
    out = []
    for s in scenes:
        path = Path(s).expanduser()
        problem = file_problem(path)
        if problem is not None:
            raise ImageReadError(path, problem)
        out.append(tile_scene(path.resolve(), progress=progress, **settings))
    if not any(len(t) for t in out):
        raise LandlensError(f"no chip of {', '.join(str(s) for s in scenes)} has {settings['min_valid']:.0%} of its "
                            f"pixels holding data (--min-valid, --nodata)")
    return out


def scene_dataset(scenes: Sequence[str | os.PathLike[str]], *, progress: bool = False,
                  **tiling: Any) -> tuple[Any, list[Any]]:
    """The chips of ``scenes`` as an unlabelled :class:`~landlens.data.folder.ImageFolderDataset`
    (paths: chip references relative to the scenes' common folder; one class, ``""``) and each
    scene's :class:`~landlens.scenes.tiling.SceneTiles`."""
    from landlens.data.folder import ImageFolderDataset

    tiles = tile_scenes(scenes, progress=progress, **tiling)
    root = Path(os.path.commonpath([str(Path(t.scene["path"]).parent) for t in tiles]))
    paths = [f"{Path(os.path.relpath(c.ref.scene, root)).as_posix()}#{c.ref.fragment()}" for t in tiles for c in t.chips]
    ds = ImageFolderDataset(root=root, classes=[""], paths=paths, labels=np.zeros(len(paths), np.int64),
                            name="scenes")
    return ds, tiles


# --------------------------------------------------------------------------- places


@dataclass(frozen=True)
class Located:
    """An archive chip containing a point: its record, where it lies, and the point's position
    in the chip's pixels (``col``, ``row`` from its top-left corner)."""

    record: ImageRecord
    geo: GeoRecord
    col: float
    row: float

    @property
    def off_centre(self) -> float:
        """Distance of the point from the chip's centre, in chip sizes."""
        w, h = self.geo.window[2], self.geo.window[3]
        return float(np.hypot(self.col / w - 0.5, self.row / h - 0.5))


def _to_crs(crs: str, lon: float, lat: float) -> tuple[float, float]:
    from rasterio.warp import transform

    from landlens.scenes.reader import WGS84

    xs, ys = transform(WGS84, crs, [float(lon)], [float(lat)])
    return float(xs[0]), float(ys[0])


def check_lon_lat(lon: float, lat: float) -> None:
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise LandlensError(f"--at {lon},{lat}: give LON,LAT in degrees (longitude first, -180..180, "
                            f"latitude -90..90)")


def chips_at(archive: Any, lon: float, lat: float) -> list[Located]:
    """The archive's chips whose window contains the WGS84 point ``(lon, lat)``, the chip whose
    centre is nearest the point first."""
    from landlens.scenes.reader import to_pixel

    check_lon_lat(lon, lat)
    where: dict[str, tuple[float, float]] = {}
    out = []
    for id, g in archive.located().items():
        west, south, east, north = g.bounds  # west > east: across the antimeridian
        inside_lon = west <= lon <= east if west <= east else (lon >= west or lon <= east)
        if not (inside_lon and south <= lat <= north):
            continue
        if g.crs not in where:
            where[g.crs] = _to_crs(g.crs, lon, lat)
        col, row = to_pixel(g.transform, *where[g.crs])
        if 0.0 <= col < g.window[2] and 0.0 <= row < g.window[3]:
            out.append(Located(archive.record(id), g, float(col), float(row)))
    out.sort(key=lambda loc: (loc.off_centre, loc.record.id))
    return out


def _scene_refs(archive: Any) -> dict[str, str]:
    """One chip reference per scene of the archive (its settings are the scene's)."""
    out: dict[str, str] = {}
    for id, g in sorted(archive.located().items()):
        out.setdefault(g.scene, archive.record(id).path)
    return out


def archive_scenes(archive: Any) -> list[dict[str, Any]]:
    """The scenes the archive's chips come from, sorted by path: ``path``, ``name``, ``chips``
    (how many), the chip grid's ``width``, ``height``, ``transform``, ``crs`` and ``gsd``, and
    ``ref``, the reference of one of its chips (whose settings read the scene as the archive did)."""
    from collections import Counter

    from landlens.scenes.reader import Scene
    from landlens.scenes.refs import parse_chip_ref

    counts = Counter(g.scene for g in archive.located().values())
    out = []
    for path, ref in sorted(_scene_refs(archive).items()):
        chip = parse_chip_ref(ref)
        with Scene.from_ref(chip) as sc:  # type: ignore[arg-type]
            out.append({"path": path, "name": Path(path).name, "chips": int(counts[path]), "width": sc.grid.width,
                        "height": sc.grid.height, "transform": list(sc.grid.transform), "crs": sc.grid.crs,
                        "gsd": chip.gsd, "ref": ref})  # type: ignore[union-attr]
    return out


def grid_place(scene: dict[str, Any], col: float, row: float) -> tuple[float, float]:
    """WGS84 ``(lon, lat)`` of the position ``(col, row)`` on the chip grid of a scene of
    :func:`archive_scenes` (its recorded grid: no file is opened).

    Raises:
        LandlensError: the position is outside the grid.
    """
    from rasterio.warp import transform

    from landlens.scenes.reader import WGS84, to_map

    if not (0.0 <= col <= scene["width"] and 0.0 <= row <= scene["height"]):
        raise LandlensError(f"col {col:g}, row {row:g} is outside the scene's grid ({scene['width']}x{scene['height']})")
    x, y = to_map(scene["transform"], col, row)
    lons, lats = transform(scene["crs"], WGS84, [x], [y])
    return float(lons[0]), float(lats[0])


def _cut(scene: Any, lon: float, lat: float, chip: int) -> str | None:
    """The reference of a ``chip``-pixel window of ``scene`` centred on the point (moved inside
    the grid at an edge), or ``None`` when the point is outside the scene."""
    col, row = scene.to_grid(lon, lat)
    gw, gh = scene.grid.width, scene.grid.height
    if not (0.0 <= col < gw and 0.0 <= row < gh):
        return None
    if chip > gw or chip > gh:
        raise LandlensError(f"{scene.path}: the scene ({gw}x{gh}) is smaller than one {chip}-pixel chip")
    c = min(max(int(np.floor(col - chip / 2.0 + 0.5)), 0), gw - chip)
    r = min(max(int(np.floor(row - chip / 2.0 + 0.5)), 0), gh - chip)
    return str(scene.ref((c, r, chip, chip)))


def query_at(archive: Any, lon: float, lat: float, *, scene: str | os.PathLike[str] | None = None,
             cut: bool = False) -> tuple[str, str]:
    """A query for the place ``(lon, lat)``: ``(chip reference, what it is)`` (module docstring).

    ``cut``: always cut a chip centred on the point instead of taking the archive's chip.

    Raises:
        ArchiveError: the point is outside every scene of the archive (and of ``scene``).
    """
    from landlens.scenes.reader import Scene
    from landlens.scenes.refs import parse_chip_ref

    check_lon_lat(lon, lat)
    if scene is None and not cut:
        found = chips_at(archive, lon, lat)
        if found:
            return found[0].record.path, f"chip {found[0].record.id} of the archive ({found[0].record.name})"
    tiling = {**DEFAULT_TILING, **(archive.meta.get("tiling") or {})}
    refs = _scene_refs(archive)
    if scene is not None:
        path = str(Path(scene).expanduser().resolve())
        if path in refs:
            refs = {path: refs[path]}
        else:
            with Scene(path, bands=tiling["bands"], gsd=tiling["gsd"], resampling=tiling["resampling"],
                       stretch=tiling["stretch"], nodata=tiling["nodata"]) as sc:
                ref = _cut(sc, lon, lat, int(tiling["chip"]))
            if ref is None:
                raise ArchiveError(f"{lon},{lat} is outside the scene {path}")
            return ref, f"cut from {Path(path).name}"
    if not refs:
        raise ArchiveError(f"{archive.directory} holds no chips of scenes: --at needs an archive built from "
                           f"scenes (`landlens index build SCENE.tif ...`), or --scene SCENE.tif")
    for path, sample in refs.items():
        ref0 = parse_chip_ref(sample)
        with Scene.from_ref(ref0) as sc:  # type: ignore[arg-type]
            ref = _cut(sc, lon, lat, max(ref0.width, ref0.height))  # type: ignore[union-attr]
        if ref is not None:
            return ref, f"cut from {Path(path).name}"
    raise ArchiveError(f"{lon},{lat} is outside every scene of {archive.directory}")


# --------------------------------------------------------------------------- similarity maps


class QueryScorer:
    """The similarity of RGB chips to a query vector under an archive's extractor and metric (a
    :class:`~landlens.scenes.maps.ChipScorer`): the cosine for a cosine archive, ``1 / (1 + d)``
    of the Euclidean distance ``d`` otherwise (the search's own scores)."""

    outputs = 1

    def __init__(self, archive: Any, vector: np.ndarray) -> None:
        import hashlib
        import json

        self.archive = archive
        q = np.asarray(vector, np.float32).ravel()
        self.cosine = archive.metric == "cosine"
        if self.cosine:
            norm = float(np.linalg.norm(q))
            if norm == 0.0:
                raise ArchiveError("the query's feature vector is all zeros: it has no direction to compare")
            q = q / norm
        self.q = q
        ident = json.dumps(archive.features_identity(), sort_keys=True, default=str)
        self.identity = "query:" + hashlib.sha256(q.tobytes() + ident.encode() + archive.metric.encode()).hexdigest()

    def __call__(self, chips: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        x = self.archive.embed([Image.fromarray(c) for c in chips]).astype(np.float32)
        if self.cosine:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
            return (x @ self.q)[:, None]
        return (1.0 / (1.0 + np.linalg.norm(x - self.q, axis=1)))[:, None]


def similarity_map(archive: Any, query: Any, scene: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   progress: bool = False, restart: bool = False, batch_size: int = 32, preview: bool = True,
                   **tiling: Any) -> Any:
    """"Where else looks like this": the similarity of every chip of ``scene`` to ``query`` (what
    :meth:`~landlens.retrieval.search.ArchiveSearch.query_vector` takes: an id, an image file, a
    chip reference, a PIL image, a vector) under the archive's extractor, as a float32 GeoTIFF
    ``out`` with a PNG preview (:func:`landlens.scenes.maps.make_map`; the scene need not be in
    the archive). Tiling settings (``chip``, ``stride``, ``gsd``, ``bands``, ``nodata``,
    ``stretch``, ``resampling``, ``min_valid``) default to those the archive recorded for its
    scenes, else :data:`DEFAULT_TILING`; ``stride`` (default: the chip) is the map's cell size.
    Returns the :class:`~landlens.scenes.maps.MapResult`."""
    from landlens.scenes.maps import make_map

    settings = {**DEFAULT_TILING, **(archive.meta.get("tiling") or {}),
                **{k: v for k, v in tiling.items() if v is not None}}
    unknown = set(settings) - set(DEFAULT_TILING)
    if unknown:
        raise LandlensError(f"unknown tiling setting(s): {', '.join(sorted(unknown))}")
    vector = archive.query_vector(query)
    extra: list[tuple[Any, str]] = []
    if isinstance(query, (str, os.PathLike)):
        thumb = np.asarray(archive.load_query(query).convert("RGB").resize((96, 96)))
        name = Path(str(query).split("#")[0]).name
        extra.append((thumb, f"query:\n{name if len(name) <= 24 else name[:23] + '…'}"))
    elif isinstance(query, (int, np.integer)):
        extra.append(((255, 255, 255), f"query: archive image {int(query)}"))
    return make_map(scene, QueryScorer(archive, vector), out, kind="values", value_name="similarity",
                    batch_size=batch_size, preview=preview, legend_extra=extra, restart=restart, progress=progress,
                    **settings)


# --------------------------------------------------------------------------- GeoJSON


def results_geojson(archive: Any, results: Sequence[Any], *, places: Sequence[tuple[float, float] | None] | None = None
                    ) -> dict[str, Any]:
    """Search results (:class:`~landlens.retrieval.search.SearchResult`) as an RFC 7946
    FeatureCollection: one Feature per hit, its chip's WGS84 footprint as a Polygon (``null`` for
    an image that is not a chip) and properties ``rank``, ``score``, ``distance``, ``id``,
    ``name``, ``class``, ``scene`` (file name), ``scene_path``, ``window`` (``[col, row, width,
    height]`` on the scene's chip grid), ``gsd``, ``crs`` and ``query`` (the query's position in
    ``queries``). The foreign member ``queries`` lists each query, its place (``places``) and
    its footprint when it is a chip."""
    from landlens.scenes.geojson import feature, feature_collection, polygon
    from landlens.retrieval.generations import chip_geo

    features, queries = [], []
    query_geo = chip_geo([str(r.query) for r in results])
    for qi, res in enumerate(results):
        qg = query_geo[qi]
        place = places[qi] if places is not None else None
        queries.append({"query": str(res.query), "text": getattr(res, "text", None),
                        "at": list(place) if place is not None else None,
                        "footprint": polygon(qg.footprint_wgs84) if qg is not None else None})
        for h in res.hits:
            g = archive.geo(h.record.id)
            props = {"rank": h.rank, "score": h.score, "distance": h.distance, "id": h.record.id,
                     "name": h.record.name, "class": h.record.class_name, "query": qi,
                     "scene": Path(g.scene).name if g else None, "scene_path": g.scene if g else None,
                     "window": list(g.window) if g else None, "gsd": g.gsd if g else None,
                     "crs": g.crs if g else None}
            features.append(feature(polygon(g.footprint_wgs84) if g else None, props))
    return feature_collection(features, queries=queries)


__all__ = ["DEFAULT_TILING", "Located", "QueryScorer", "archive_scenes", "check_lon_lat", "chips_at", "grid_place",
           "query_at", "results_geojson", "scene_dataset", "similarity_map", "tile_scenes"]
