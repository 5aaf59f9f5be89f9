"""Footprints of chips, exact to the pixel: in the scene CRS from the grid by hand, and in WGS84
from an independent transformation (pyproj for UTM, the inverse Mercator written out in
``fixtures.scenes`` for EPSG:3395, nothing for EPSG:4326), with rings closed and turning
counter-clockwise as RFC 7946 asks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures.scenes import GEOGRAPHIC, MERCATOR, UTM, corners, geographic_scene, inverse_mercator, mercator_scene, utm_scene
from landlens.scenes.reader import Scene
from landlens.scenes.tiling import tile_scene


def _signed_area(ring: list) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def _check_ring(ring: list, want: list[tuple[float, float]], tol: float) -> None:
    """``ring`` is closed, turns counter-clockwise and goes through the corners ``want``
    (top-left, bottom-left, bottom-right, top-right: counter-clockwise for north up)."""
    assert len(ring) == 5 and tuple(ring[0]) == tuple(ring[-1])
    assert _signed_area(ring) > 0
    start = min(range(4), key=lambda k: np.hypot(ring[0][0] - want[k][0], ring[0][1] - want[k][1]))
    for k in range(4):
        got, exp = ring[k], want[(start + k) % 4]
        assert got[0] == pytest.approx(exp[0], abs=tol) and got[1] == pytest.approx(exp[1], abs=tol), (k, got, exp)


def test_utm_scene_footprints(tmp_path: Path) -> None:
    from pyproj import Transformer

    path, _ = utm_scene(tmp_path / "utm.tif")
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    tiles = tile_scene(path, chip=64, stride=48)
    assert len(tiles.chips) > 10
    for chip in tiles.chips:
        native = corners(UTM["origin"], UTM["res"], chip.window)
        _check_ring(chip.footprint, native, 1e-6)  # metres
        _check_ring(chip.footprint_wgs84, [to_wgs.transform(x, y) for x, y in native], 1e-9)  # degrees: 0.1 mm


def test_utm_scene_footprints_at_another_gsd(tmp_path: Path) -> None:
    from pyproj import Transformer

    path, _ = utm_scene(tmp_path / "utm.tif")
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    tiles = tile_scene(path, chip=32, gsd=25)  # 320 x 256 px of 10 m -> 128 x 102 of 25 m
    assert tiles.scene["grid"]["width"] == 128 and tiles.scene["grid"]["height"] == 102
    for chip in tiles.chips:
        native = corners(UTM["origin"], UTM["res"], chip.window, scale=2.5)
        _check_ring(chip.footprint, native, 1e-6)
        _check_ring(chip.footprint_wgs84, [to_wgs.transform(x, y) for x, y in native], 1e-9)


def test_mercator_scene_footprints(tmp_path: Path) -> None:
    path, _ = mercator_scene(tmp_path / "drone.tif")
    for gsd, scale in ((None, 1.0), (1.0, 2.0)):
        tiles = tile_scene(path, chip=32, gsd=gsd)
        for chip in tiles.chips:
            native = corners(MERCATOR["origin"], MERCATOR["res"], chip.window, scale=scale)
            _check_ring(chip.footprint, native, 1e-6)
            _check_ring(chip.footprint_wgs84, [inverse_mercator(x, y) for x, y in native], 1e-9)
            lon, lat = chip.footprint_wgs84[0]
            assert 120.9 < lon < 121.1 and 14.5 < lat < 14.7  # Manila


def test_geographic_scene_footprints_are_its_own_coordinates(tmp_path: Path) -> None:
    path, _ = geographic_scene(tmp_path / "geo.tif")
    tiles = tile_scene(path, chip=32, stride=16)
    for chip in tiles.chips:
        native = corners(GEOGRAPHIC["origin"], GEOGRAPHIC["res"], chip.window)
        _check_ring(chip.footprint, native, 1e-12)
        _check_ring(chip.footprint_wgs84, native, 1e-12)  # longitude first


def test_a_point_maps_to_its_pixel(tmp_path: Path) -> None:
    from pyproj import Transformer

    path, _ = utm_scene(tmp_path / "utm.tif")
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    lon, lat = to_wgs.transform(UTM["origin"][0] + 123.5 * 10, UTM["origin"][1] - 77.25 * 10)
    with Scene(path) as sc:
        col, row = sc.to_grid(lon, lat)
    assert col == pytest.approx(123.5, abs=1e-6) and row == pytest.approx(77.25, abs=1e-6)


def test_footprints_across_the_antimeridian(tmp_path: Path) -> None:
    """A UTM 60N scene straddling 180 degrees: the crossing chip's ring keeps its corners (pyproj),
    turns counter-clockwise on continuous longitudes, its bounds have west > east (RFC 7946 5.2),
    its GeoJSON is a MultiPolygon cut at the antimeridian whose parts add up to the whole, and
    a place just east of 180 degrees finds it."""
    from pyproj import Transformer

    from fixtures.scenes import texture, write_scene
    from landlens.retrieval.archive import Archive
    from landlens.scenes.geojson import crosses_antimeridian, polygon, unwrap
    from test_scenes_cli import check_rfc7946

    crs = "EPSG:32660"
    to_wgs = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    x180, _ = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(180.0, 1.0)
    origin = (round(x180) - 960.0, 110_640.0)
    data = (10 + texture(64, 192, 3, seed=5) * 240).astype(np.uint8)
    path = write_scene(tmp_path / "dateline.tif", data, crs, origin, (10.0, 10.0))
    tiles = tile_scene(path, chip=64)
    assert [c.window for c in tiles.chips] == [(0, 0, 64, 64), (64, 0, 64, 64), (128, 0, 64, 64)]
    crossing = tiles.chips[1]
    ring = crossing.footprint_wgs84
    assert crosses_antimeridian(ring) and not crosses_antimeridian(tiles.chips[0].footprint_wgs84)
    want = [to_wgs.transform(x, y) for x, y in corners(origin, (10.0, 10.0), crossing.window)]
    _check_ring(unwrap(ring), [(x + 360 if x < 0 else x, y) for x, y in want], 1e-9)
    geo = polygon(ring)
    assert geo["type"] == "MultiPolygon" and len(geo["coordinates"]) == 2
    east, west = (part[0] for part in geo["coordinates"])
    assert max(x for x, _ in east) == 180.0 and min(x for x, _ in west) == -180.0
    assert all(0 < x <= 180 for x, _ in east) and all(-180 <= x < 0 for x, _ in west)
    whole = _signed_area(unwrap(ring))
    parts = _signed_area(east) + _signed_area([(x + 360, y) for x, y in west])
    assert _signed_area(east) > 0 and _signed_area(west) > 0 and parts == pytest.approx(whole, rel=1e-9)
    check_rfc7946({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": geo, "properties": {}}]})

    arch = Archive.build_from_scenes([path], tmp_path / "a.archive", chip=64, backbone="lbp_rgb", rerank=None,
                                     workers=0, progress=False)
    g = arch.geo(next(r.id for r in arch.records() if arch.geo(r.id).window == (64, 0, 64, 64)))
    assert g.bounds[0] > 179.99 and g.bounds[2] < -179.99  # west > east
    lon, lat = to_wgs.transform(x180 + 100.0, origin[1] - 320.0)  # just east of 180 degrees
    assert lon < 0
    assert [arch.geo(r.id).window for r in arch.locate(lon, lat)] == [(64, 0, 64, 64)]
