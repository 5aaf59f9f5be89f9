"""Archives of scenes: every chip's scene, window and footprints in the catalog, kept through
updates beside image files; a chip as a query finds itself first; queries given as a place."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fixtures.make_datasets import class_image, write_image
from fixtures.scenes import MERCATOR, UTM, corners, geographic_scene, inverse_mercator, mercator_scene, utm_scene
from landlens.errors import LandlensError
from landlens.retrieval.archive import Archive, ArchiveError
from landlens.retrieval.geo import chips_at, query_at, results_geojson
from landlens.retrieval.search import search_files
from landlens.scenes.tiling import chip_windows

BUILD = {"backbone": "lbp_rgb", "rerank": None, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scenes")
    return {"utm": utm_scene(d / "utm.tif")[0], "merc": mercator_scene(d / "sub" / "drone.tif")[0],
            "geo": geographic_scene(d / "geo.tif")[0]}


@pytest.fixture(scope="module")
def built(scenes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scene_archive") / "arch"
    Archive.build_from_scenes([scenes["utm"], scenes["merc"]], out, chip=64, **BUILD)
    return out


@pytest.fixture()
def arch(built: Path, tmp_path: Path) -> Archive:
    shutil.copytree(built, tmp_path / "arch")
    return Archive.open(tmp_path / "arch")


def _wgs(scene: str, window: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Independent WGS84 corners of a window of the test scenes (no gsd)."""
    if scene.endswith("utm.tif"):
        from pyproj import Transformer

        t = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
        return [t.transform(x, y) for x, y in corners(UTM["origin"], UTM["res"], window)]
    return [inverse_mercator(x, y) for x, y in corners(MERCATOR["origin"], MERCATOR["res"], window)]


def _same_ring(ring, want, tol: float = 1e-9) -> bool:
    pts = [tuple(p) for p in ring[:-1]]
    return all(any(abs(p[0] - w[0]) <= tol and abs(p[1] - w[1]) <= tol for p in pts) for w in want)


def test_every_chip_is_located_in_the_catalog(arch: Archive, scenes: dict[str, Path]) -> None:
    utm_windows = set(chip_windows(320, 256, 64)) - {(0, 0, 64, 64), (256, 192, 64, 64)}  # without data
    merc_windows = set(chip_windows(256, 192, 64))
    assert len(arch) == len(utm_windows) + len(merc_windows) == 30
    located = arch.located()
    assert set(located) == {r.id for r in arch.records()}
    by_scene: dict[str, set] = {}
    for r in arch.records():
        g = located[r.id]
        by_scene.setdefault(g.scene, set()).add(g.window)
        assert r.class_name is None and r.path.startswith(g.scene + "#window=")
        assert r.name == f"{Path(g.scene).name}#window={','.join(map(str, g.window))}"
        assert (r.width, r.height) == (64, 64)
        assert _same_ring(g.footprint_wgs84, _wgs(g.scene, g.window))
        lons = [p[0] for p in g.footprint_wgs84]
        assert g.bounds[0] == min(lons) and g.bounds[2] == max(lons)
    assert by_scene == {str(scenes["utm"].resolve()): utm_windows, str(scenes["merc"].resolve()): merc_windows}
    assert arch.meta["tiling"]["chip"] == 64 and arch.info()["chips"] == 30
    # the catalog itself: one geo row per chip, read without landlens
    (seg,) = json.loads((arch.directory / f"gen-{arch.generation:08d}" / "generation.json").read_text())["segments"]
    con = sqlite3.connect(arch.directory / seg["path"] / "catalog.sqlite")
    rows = con.execute("SELECT g.id, g.scene, g.col_off, g.row_off, g.width, g.height, i.path FROM geo g "
                       "JOIN images i ON i.id = g.id").fetchall()
    con.close()
    assert len(rows) == 30 and all(p.startswith(f"{s}#window={c},{r},{w},{h}&") for _, s, c, r, w, h, p in rows)


def test_a_chip_query_finds_its_own_footprint_first(arch: Archive, scenes: dict[str, Path]) -> None:
    for scene, window in ((scenes["utm"], (128, 64, 64, 64)), (scenes["merc"], (64, 128, 64, 64))):
        ref = f"{scene}#window={','.join(map(str, window))}"  # written by hand: defaults filled by the reader
        res = search_files(arch, [ref], k=3)[0]
        top = res.hits[0]
        assert res.query_id == top.record.id and top.distance == pytest.approx(0.0, abs=1e-5)
        g = arch.geo(top.record.id)
        assert g is not None and g.window == window and _same_ring(g.footprint_wgs84, _wgs(str(scene), window))
        # without knowing it is an archive image, the nearest vector is still its own
        hits = arch.search(ref, k=2)
        assert hits[0].record.id == top.record.id and hits[0].distance < hits[1].distance


def test_a_place_is_the_chip_containing_it(arch: Archive, scenes: dict[str, Path]) -> None:
    from pyproj import Transformer

    t = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    x0, y0 = UTM["origin"]
    lon, lat = t.transform(x0 + 200 * 10 + 3, y0 - 100 * 10 - 3)  # pixel (200, 100): chip (192, 64)
    found = chips_at(arch, lon, lat)
    assert [arch.geo(f.record.id).window for f in found] == [(192, 64, 64, 64)]
    assert found[0].col == pytest.approx(8.3, abs=1e-6) and found[0].row == pytest.approx(36.3, abs=1e-6)
    ref, what = query_at(arch, lon, lat)
    assert ref == found[0].record.path and "chip" in what
    assert arch.locate(lon, lat) == [found[0].record]
    # cut centred on the point instead: a 64-pixel window around pixel (200.3, 100.3)
    cut, what = query_at(arch, lon, lat, cut=True)
    assert "#window=168,68,64,64&" in cut and "cut from utm.tif" in what
    assert cut.split("&", 1)[1] == found[0].record.path.split("&", 1)[1]  # the scene's recorded settings


def test_a_place_in_a_skipped_chip_is_cut_from_its_scene(arch: Archive, scenes: dict[str, Path]) -> None:
    from pyproj import Transformer

    t = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    lon, lat = t.transform(UTM["origin"][0] + 5 * 10, UTM["origin"][1] - 5 * 10)  # in the nodata corner
    assert chips_at(arch, lon, lat) == []
    ref, what = query_at(arch, lon, lat)
    assert "#window=0,0,64,64&" in ref and "cut from utm.tif" in what  # moved inside the scene at its edge
    with pytest.raises(ArchiveError, match="outside every scene"):
        query_at(arch, 10.0, 10.0)
    with pytest.raises(LandlensError, match="longitude first"):
        query_at(arch, 14.0, 95.0)
    # a scene outside the archive, read with the archive's tiling
    other, _ = geographic_scene(scenes["geo"].parent / "other.tif")
    ref, what = query_at(arch, -47.95 + 80e-4, -15.75 - 60e-4, scene=other)
    assert "other.tif#window=48,28,64,64&" in ref and "cut from other.tif" in what


def test_geo_is_kept_through_add_and_remove_beside_image_files(arch: Archive, scenes: dict[str, Path],
                                                             tmp_path: Path) -> None:
    gone = [r.id for r in arch.records()[:3]]
    located = arch.located()
    assert arch.remove(gone) == 3
    assert set(arch.located()) == set(located) - set(gone)
    image = tmp_path / "forest" / "f.jpg"
    write_image(image, class_image(1, 0, (64, 64)))
    (rec,) = arch.add([image], ["forest"])
    assert arch.geo(rec.id) is None and arch.record(rec.id).class_name == "forest"
    added = arch.add_scenes([scenes["geo"]], chip=32)  # other chip size than the archive's
    assert len(added) == len(chip_windows(160, 128, 32)) == 20
    g = arch.geo(added[0].id)
    assert g is not None and g.crs == "EPSG:4326" and g.window == (0, 0, 32, 32)
    assert arch.add_scenes([scenes["geo"]], chip=32) == []  # the same chips: skipped
    again = Archive.open(arch.directory)  # all of it on disk
    assert again.located() == arch.located() and len(again.located()) == 30 - 3 + 20
    assert again.geo(rec.id) is None
    # hits that are image files have no geometry
    res = search_files(again, [image], k=len(again))[0]
    doc = results_geojson(again, [res])
    nulls = [f for f in doc["features"] if f["geometry"] is None]
    assert len(nulls) == 1 and nulls[0]["properties"]["id"] == rec.id


def test_a_chip_reference_can_be_added_like_a_file(arch: Archive, scenes: dict[str, Path]) -> None:
    ref = f"{scenes['merc']}#window=10,10,40,40&gsd=1"
    (rec,) = arch.add([ref])
    g = arch.geo(rec.id)
    assert g is not None and g.window == (10, 10, 40, 40) and g.gsd == 1.0
    assert rec.path == f"{scenes['merc'].resolve()}#window=10,10,40,40&bands=1,2,3&gsd=1&resampling=average&stretch=none"
    assert arch.add([ref]) == []  # the same chip again: skipped by its digest


def test_a_scene_build_refuses_what_it_cannot_tile(scenes: dict[str, Path], tmp_path: Path) -> None:
    from fixtures.scenes import write_scene

    with pytest.raises(LandlensError, match="smaller than one 512-pixel chip"):
        Archive.build_from_scenes([scenes["utm"]], tmp_path / "a", chip=512, **BUILD)
    data = np.full((3, 64, 64), 50, np.uint8)
    data[:, :, :40] = 0
    sparse = write_scene(tmp_path / "sparse.tif", data, UTM["crs"], UTM["origin"], UTM["res"], nodata=0)
    with pytest.raises(LandlensError, match="no chip of .*sparse.tif has 50% of its pixels holding data"):
        Archive.build_from_scenes([sparse], tmp_path / "b", chip=64, **BUILD)
    with pytest.raises(LandlensError, match="nope.tif: file not found"):
        Archive.build_from_scenes([tmp_path / "nope.tif"], tmp_path / "c", **BUILD)
    for name in "abc":
        assert not (tmp_path / name / "CURRENT").exists()


def test_the_service_thumbnails_a_chip_by_its_reference(arch: Archive) -> None:
    import asyncio
    import io

    from PIL import Image

    from landlens.service.budget import WeightedSemaphore
    from landlens.service.thumbnails import Thumbnailer

    rec = arch.records()[5]
    th = Thumbnailer(WeightedSemaphore(64 * 1024 * 1024), rgb_bands=lambda: (0, 1, 2))
    jpeg = asyncio.run(th.get(rec, 128))
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.size == (64, 64)  # never enlarged
