"""`landlens index build SCENE.tif ...`, `index add --tile`, and `landlens search --at LON,LAT
--geojson`: the GeoJSON checked against RFC 7946 and against pyproj, never against landlens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.make_datasets import make_folder_dataset
from fixtures.scenes import GEOGRAPHIC, UTM, corners, geographic_scene, mercator_scene, utm_scene
from landlens.cli.main import cli

FAST = ["-b", "lbp_rgb", "--plain", "--workers", "0"]


def _run(*args: str, ok: bool = True):  # noqa: ANN202
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def check_rfc7946(doc: dict) -> None:
    """A FeatureCollection of Features with Polygon, MultiPolygon (or null) geometries as RFC 7946 defines them:
    no ``crs`` member (WGS84 only, section 4), positions [longitude, latitude] within range
    (3.1.1), closed linear rings of four or more positions (3.1.6), exterior rings
    counter-clockwise (3.1.6, the right-hand rule)."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list) and "crs" not in doc
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["properties"], dict) and "geometry" in f
        geom = f["geometry"]
        if geom is None:
            continue
        assert geom["type"] in ("Polygon", "MultiPolygon")  # MultiPolygon: cut at the antimeridian (3.1.9)
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polygons:
            assert len(rings) >= 1
            for k, ring in enumerate(rings):
                assert len(ring) >= 4 and ring[0] == ring[-1]
                for pos in ring:
                    assert len(pos) == 2 and all(isinstance(v, float) for v in pos)
                    assert -180 <= pos[0] <= 180 and -90 <= pos[1] <= 90
                area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
                assert (area > 0) if k == 0 else (area < 0)


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_scenes")
    return {"utm": utm_scene(d / "utm.tif")[0], "merc": mercator_scene(d / "drone.tif")[0],
            "geo": geographic_scene(d / "geo.tif")[0]}


def test_build_then_search_a_place_as_geojson(scene_files: dict[str, Path], tmp_path: Path) -> None:
    from pyproj import Transformer

    arch = tmp_path / "scenes.archive"
    out = _run("index", "build", scene_files["utm"], scene_files["merc"], "--chip", "64", "--stride", "32",
               "--out", arch, *FAST).output
    assert "chips of 2 scene(s) (chip 64, stride 32)" in out and "drone.tif, utm.tif" in out
    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    x0, y0 = UTM["origin"]
    lon, lat = to_wgs.transform(x0 + 200.3 * 10, y0 - 100.3 * 10)  # pixel (200.3, 100.3) of utm.tif
    hits = tmp_path / "hits.geojson"
    res = _run("search", arch, "--at", f"{lon},{lat}", "-k", "5", "--geojson", hits, "--json")
    doc = json.loads(hits.read_text())
    check_rfc7946(doc)
    assert len(doc["features"]) == 5
    first = doc["features"][0]
    props = first["properties"]
    assert {"rank", "score", "id", "scene", "window"} <= set(props)
    # the chip holding the point whose centre is nearest it: columns 160-224, rows 64-128
    assert props["rank"] == 1 and props["scene"] == "utm.tif" and props["window"] == [160, 64, 64, 64]
    assert props["score"] == pytest.approx(1.0, abs=1e-5)
    want = [to_wgs.transform(x, y) for x, y in corners(UTM["origin"], UTM["res"], (160, 64, 64, 64))]
    ring = first["geometry"]["coordinates"][0]
    for w in want:  # longitude first, exact to a tenth of a millimetre
        assert any(abs(p[0] - w[0]) < 1e-9 and abs(p[1] - w[1]) < 1e-9 for p in ring[:-1])
    assert [f["properties"]["rank"] for f in doc["features"]] == [1, 2, 3, 4, 5]
    assert doc["queries"][0]["at"] == [lon, lat] and doc["queries"][0]["footprint"] == first["geometry"]
    printed = json.loads(res.output)
    assert printed["geojson"] == str(hits) and printed["results"][0]["hits"][0]["id"] == props["id"]
    text = _run("search", arch, "--at", f"{lon},{lat}", "-k", "2").output
    assert f"query at {lon},{lat}: chip {props['id']} of the archive (utm.tif#window=160,64,64,64)" in text


def test_scenes_added_by_tiling_and_a_negative_longitude(scene_files: dict[str, Path], tmp_path: Path) -> None:
    arch = tmp_path / "a.archive"
    _run("index", "build", scene_files["merc"], "--chip", "64", "--out", arch, *FAST)
    out = _run("index", "add", arch, scene_files["geo"], "--tile", "--chip", "32").output
    assert "added 20 chip(s) of 1 scene(s)" in out
    lon = GEOGRAPHIC["origin"][0] + 40.5e-4
    lat = GEOGRAPHIC["origin"][1] - 70.5e-4
    hits = tmp_path / "h.geojson"
    _run("search", arch, f"--at={lon},{lat}", "-k", "3", "--geojson", hits)
    doc = json.loads(hits.read_text())
    check_rfc7946(doc)
    first = doc["features"][0]
    assert first["properties"]["scene"] == "geo.tif" and first["properties"]["window"] == [32, 64, 32, 32]
    ring = first["geometry"]["coordinates"][0]
    want = corners(GEOGRAPHIC["origin"], GEOGRAPHIC["res"], (32, 64, 32, 32))
    for w in want:
        assert any(abs(p[0] - w[0]) < 1e-12 and abs(p[1] - w[1]) < 1e-12 for p in ring[:-1])


def test_user_errors_are_one_line(scene_files: dict[str, Path], tmp_path: Path) -> None:
    folder = make_folder_dataset(tmp_path / "imgs", ["a", "b"], per_class=2, size=32)
    res = _run("index", "build", folder, "--chip", "64", "--out", tmp_path / "x", *FAST, ok=False)
    assert res.exit_code == 2 and "--chip tiles scenes" in res.output and "Traceback" not in res.output
    res = _run("index", "build", folder, scene_files["utm"], "--out", tmp_path / "x", *FAST, ok=False)
    assert res.exit_code == 2 and "give one folder of class sub-folders, or scene files" in res.output
    res = _run("index", "build", tmp_path / "missing.tif", "--out", tmp_path / "x", *FAST, ok=False)
    assert res.exit_code == 2 and "missing.tif: file not found" in res.output
    arch = tmp_path / "u.archive"
    _run("index", "build", scene_files["utm"], "--chip", "128", "--out", arch, *FAST)
    res = _run("search", arch, "--at", "200,10", ok=False)
    assert res.exit_code == 2 and "longitude first" in res.output
    res = _run("search", arch, "--at", "15", ok=False)
    assert res.exit_code == 2 and "LON,LAT" in res.output
    res = _run("search", arch, "--at", "1,1", ok=False)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "outside every scene" in res.output
    res = _run("search", arch, "--scene", scene_files["utm"], ok=False)
    assert res.exit_code == 2 and "give --at LON,LAT" in res.output
    res = _run("index", "add", arch, scene_files["geo"], "--chip", "32", ok=False)
    assert res.exit_code == 2 and "add --tile" in res.output
