"""The service answers with places: GeoJSON (RFC 7946) from search by an indexed chip, by an
upload and by a place (`GET /api/search/at`), footprints checked against pyproj."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from fixtures.scenes import UTM, corners, utm_scene
from landlens.scenes.reader import read_chip_rgb
from landlens.scenes.refs import ChipRef
from test_scenes_cli import check_rfc7946


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return utm_scene(tmp_path_factory.mktemp("svc_scene") / "utm.tif")[0]


@pytest.fixture(scope="module")
def client(scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from landlens.retrieval.archive import Archive
    from landlens.service.app import create_app

    out = tmp_path_factory.mktemp("svc_archive") / "a.archive"
    Archive.build_from_scenes([scene], out, chip=64, backbone="lbp_rgb", rerank=None, workers=0, progress=False)
    with TestClient(create_app(out, optimize="none"), base_url="http://localhost") as c:
        yield c


def _wgs(window: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    from pyproj import Transformer

    t = Transformer.from_crs(UTM["crs"], "EPSG:4326", always_xy=True)
    return [t.transform(x, y) for x, y in corners(UTM["origin"], UTM["res"], window)]


def _has_corners(ring: list[list[float]], want: list[tuple[float, float]]) -> bool:
    return all(any(abs(p[0] - w[0]) < 1e-9 and abs(p[1] - w[1]) < 1e-9 for p in ring) for w in want)


def _centre(window: tuple[int, int, int, int]) -> tuple[float, float]:
    from pyproj import Transformer

    c, r, w, h = window
    x, y = UTM["origin"][0] + (c + w / 2) * 10, UTM["origin"][1] - (r + h / 2) * 10
    return Transformer.from_crs(UTM["crs"], "EPSG:4326", always_xy=True).transform(x, y)


def test_search_at_a_place_answers_geojson(client: Any) -> None:
    lon, lat = _centre((128, 64, 64, 64))
    r = client.get("/api/search/at", params={"lon": lon, "lat": lat, "k": 3, "format": "geojson"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/geo+json")
    doc = r.json()
    check_rfc7946(doc)
    first = doc["features"][0]
    assert first["properties"]["rank"] == 1 and first["properties"]["window"] == [128, 64, 64, 64]
    assert _has_corners(first["geometry"]["coordinates"][0], _wgs((128, 64, 64, 64)))
    assert len(doc["features"]) == 3 and doc["queries"][0]["at"] == [lon, lat]
    js = client.get("/api/search/at", params={"lon": lon, "lat": lat, "k": 3}).json()
    assert [h["id"] for h in js["results"]] == [f["properties"]["id"] for f in doc["features"]]
    assert client.get("/api/search/at", params={"lon": 10.0, "lat": 10.0}).status_code == 404
    assert client.get("/api/search/at", params={"lon": 200.0, "lat": 10.0}).status_code == 422
    assert client.get("/api/search/at", params={"lon": lon, "lat": lat, "format": "kml"}).status_code == 422


def test_search_by_id_and_by_upload_answer_geojson(client: Any, scene: Path, tmp_path: Path) -> None:
    js = client.get("/api/search/0", params={"k": 4}).json()
    doc = client.get("/api/search/0", params={"k": 4, "format": "geojson"}).json()
    check_rfc7946(doc)
    assert [f["properties"]["id"] for f in doc["features"]] == [h["id"] for h in js["results"]]
    for f in doc["features"]:
        assert _has_corners(f["geometry"]["coordinates"][0], _wgs(tuple(f["properties"]["window"])))
    q = tmp_path / "q.png"
    Image.fromarray(read_chip_rgb(ChipRef(str(scene), (192, 128, 64, 64)))).save(q)
    with open(q, "rb") as f:
        r = client.post("/api/search", files={"file": ("q.png", f, "image/png")}, data={"k": "2", "format": "geojson"})
    assert r.status_code == 200, r.text
    up = r.json()
    check_rfc7946(up)
    assert up["features"][0]["properties"]["window"] == [192, 128, 64, 64]
    assert up["queries"][0]["footprint"] is None


def test_scenes_are_listed_with_an_overview_of_their_chip_grid(client: Any, scene: Path) -> None:
    import io

    import numpy as np

    doc = client.get("/api/scenes").json()
    assert len(doc["scenes"]) == 1
    sc = doc["scenes"][0]
    assert (sc["index"], sc["name"], sc["chips"], sc["width"], sc["height"]) == (0, "utm.tif", 18, 320, 256)
    assert "path" not in sc and "ref" not in sc  # no server path
    r = client.get(sc["overview"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape == (256, 320, 3)  # the whole chip grid, not decimated below 1024 px
    np.testing.assert_array_equal(png[64:128, 128:192], read_chip_rgb(ChipRef(str(scene), (128, 64, 64, 64))))
    assert client.get("/api/scenes/3/overview.png").status_code == 404


def test_search_at_a_position_of_a_scene_grid(client: Any) -> None:
    r = client.get("/api/search/at", params={"scene": 0, "col": 150.0, "row": 80.0, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["place"] == {"scene": 0, "window": [128, 64, 64, 64]} and body["query_token"]
    assert body["results"][0]["place"] == {"scene": 0, "window": [128, 64, 64, 64]}
    assert all(h["place"]["scene"] == 0 for h in body["results"])
    lon, lat = _centre((128, 64, 64, 64))
    by_place = client.get("/api/search/at", params={"lon": lon, "lat": lat, "k": 3}).json()
    assert [h["id"] for h in by_place["results"]] == [h["id"] for h in body["results"]]
    feedback = client.post("/api/search/feedback", json={"query": {"vector_token": body["query_token"]}, "k": 3,
                                                          "relevant": [body["results"][1]["id"]]})
    assert feedback.status_code == 200, feedback.text
    for bad in ({"scene": 0, "col": 1.0}, {"scene": 0, "col": 1.0, "row": 1.0, "lon": lon}, {},
                {"scene": 0, "col": 400.0, "row": 1.0}):
        assert client.get("/api/search/at", params=bad).status_code == 422, bad
    assert client.get("/api/search/at", params={"scene": 4, "col": 1.0, "row": 1.0}).status_code == 404
