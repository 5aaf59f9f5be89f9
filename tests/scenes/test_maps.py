"""Maps of scenes (`landlens.scenes.maps`): cell values against a brute force over the windows,
class maps against a known layout, nodata, the files written, resuming an interrupted map, and
the land-use and similarity maps of a trained run and an archive against their own predictions."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fixtures.scenes import UTM, utm_scene, write_scene
from landlens.errors import LandlensError
from landlens.scenes.maps import NODATA_CLASS, make_map
from landlens.scenes.preview import class_colours
from landlens.scenes.reader import read_chip_rgb
from landlens.scenes.refs import ChipRef

PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.uint8)
CLASSES = ["red", "green", "blue", "yellow"]


class MeanScorer:
    """One output: the mean of a chip's pixels in [0, 1]; counts the chips it saw."""

    outputs = 1
    identity = "mean"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.chips = 0
        self.fail_after = fail_after

    def __call__(self, chips: list[np.ndarray]) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.chips += len(chips)
        return np.array([[c.astype(np.float64).mean() / 255.0] for c in chips], np.float32)


class NearestColour:
    """Class scores: one-hot of the palette colour nearest a chip's mean colour."""

    outputs = len(CLASSES)
    identity = "nearest-colour"

    def __call__(self, chips: list[np.ndarray]) -> np.ndarray:
        means = np.array([c.reshape(-1, 3).mean(0) for c in chips])
        best = ((means[:, None, :] - PALETTE[None].astype(float)) ** 2).sum(-1).argmin(1)
        return np.eye(len(CLASSES), dtype=np.float32)[best]


def _offsets(size: int, chip: int, stride: int) -> list[int]:
    out = list(range(0, size - chip + 1, stride))
    return out + [size - chip] if out[-1] + chip < size else out


def _read(path: Path) -> tuple[np.ndarray, dict]:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(), {"transform": tuple(src.transform)[:6], "crs": src.crs.to_string(), "nodata": src.nodata,
                            "tags": src.tags(), "tags1": src.tags(1), "colormap": src.colormap(1) if src.count == 1
                            and src.dtypes[0] == "uint8" else None}


@pytest.mark.parametrize("size,chip,stride", [((320, 256), 64, 32), ((300, 250), 64, 64), ((300, 250), 96, 40)])
def test_cells_average_the_windows_holding_their_centre(tmp_path: Path, size, chip: int, stride: int) -> None:
    w, h = size
    scene, data = utm_scene(tmp_path / "utm.tif", width=w, height=h)
    valid = (data != 0).any(0)
    res = make_map(scene, MeanScorer(), tmp_path / "m.tif", kind="values", chip=chip, stride=stride, preview=False)
    got, meta = _read(tmp_path / "m.tif")
    # brute force: every window's score, then each cell's mean over the windows holding its centre
    scores = {}
    for r in _offsets(h, chip, stride):
        for c in _offsets(w, chip, stride):
            if valid[r:r + chip, c:c + chip].mean() >= 0.5:
                rgb = read_chip_rgb(ChipRef(str(scene), (c, r, chip, chip)))
                scores[(c, r)] = rgb.astype(np.float64).mean() / 255.0
    nc, nr = -(-w // stride), -(-h // stride)
    want = np.full((nr, nc), np.nan)
    for j in range(nr):
        for i in range(nc):
            x0, y0 = i * stride, j * stride
            x1, y1 = min(x0 + stride, w), min(y0 + stride, h)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            hold = [s for (c, r), s in scores.items() if c <= cx < c + chip and r <= cy < r + chip]
            if hold and valid[y0:y1, x0:x1].mean() >= 0.5:
                want[j, i] = np.mean(hold)
    assert got.shape == (1, nr, nc) and res.cells == (nc, nr)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-6)
    assert np.isnan(want).any() and np.isfinite(want).any()  # the nodata corner shows in the map
    assert res.scored == len(scores) and res.nodata_cells == int(np.isnan(want).sum())
    x0, y0 = UTM["origin"]
    assert meta["transform"] == (10.0 * stride, 0.0, x0, 0.0, -10.0 * stride, y0) and meta["crs"] == UTM["crs"]
    assert res.value_range == pytest.approx((np.nanmin(want), np.nanmax(want)), abs=1e-6)
    assert not (tmp_path / "m.tif.partial").exists()


def _blocks(tmp_path: Path, layout: np.ndarray, block: int = 64, nodata_block: tuple[int, int] | None = None) -> Path:
    img = PALETTE[layout].repeat(block, 0).repeat(block, 1).transpose(2, 0, 1).copy()
    if nodata_block is not None:
        r, c = nodata_block
        img[:, r * block:(r + 1) * block, c * block:(c + 1) * block] = 0
    return write_scene(tmp_path / "blocks.tif", img, UTM["crs"], UTM["origin"], UTM["res"], nodata=0)


def test_a_class_map_shows_the_layout_with_its_class_table(tmp_path: Path) -> None:
    layout = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]])
    scene = _blocks(tmp_path, layout, nodata_block=(2, 0))
    res = make_map(scene, NearestColour(), tmp_path / "landuse.tif", classes=CLASSES, chip=64,
                   probabilities=tmp_path / "probs.tif")
    got, meta = _read(tmp_path / "landuse.tif")
    want = layout.copy()
    want[2, 0] = NODATA_CLASS
    np.testing.assert_array_equal(got[0], want)
    assert meta["nodata"] == NODATA_CLASS and json.loads(meta["tags"]["landlens_classes"]) == CLASSES
    assert meta["tags1"]["CLASS_2"] == "blue"
    colours = class_colours(4)
    assert all(meta["colormap"][i][:3] == colours[i] for i in range(4))
    cats = [c.text for c in ET.parse(str(tmp_path / "landuse.tif.aux.xml")).getroot().iter("Category")]
    assert cats == CLASSES
    with open(tmp_path / "landuse.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert [int(r["cells"]) for r in rows] == [int((want == k).sum()) for k in range(4)] and res.nodata_cells == 1
    probs, pmeta = _read(tmp_path / "probs.tif")
    assert probs.shape == (4, 3, 4) and np.isnan(probs[:, 2, 0]).all()
    np.testing.assert_array_equal(probs[:, 0, 2], [0, 0, 1, 0])
    preview = Image.open(tmp_path / "landuse.png")
    assert preview.format == "PNG" and preview.width > 512
    from landlens.training.landuse import map_accuracy

    truth = layout.copy()
    truth[0, 0], truth[1, 1] = 3, -1  # one cell wrong, one unknown; the nodata cell is left out
    assert map_accuracy(tmp_path / "landuse.tif", truth, CLASSES) == {"cells": 10, "correct": 9, "accuracy": 0.9,
                                                                      "nodata_cells": 1}
    with pytest.raises(LandlensError, match="classes"):
        map_accuracy(tmp_path / "landuse.tif", truth, CLASSES[::-1])


def test_an_interrupted_map_resumes_where_it_stopped(tmp_path: Path) -> None:
    scene, _ = utm_scene(tmp_path / "utm.tif")
    whole = MeanScorer()
    make_map(scene, whole, tmp_path / "whole.tif", kind="values", chip=64, stride=32, batch_size=4, preview=False)
    out = tmp_path / "m.tif"
    with pytest.raises(KeyboardInterrupt):
        make_map(scene, MeanScorer(fail_after=3), out, kind="values", chip=64, stride=32, batch_size=4, preview=False)
    assert not out.exists() and (tmp_path / "m.tif.partial" / "state.json").is_file()
    with pytest.raises(LandlensError, match="--restart"):  # other settings: the unfinished map is kept
        make_map(scene, MeanScorer(), out, kind="values", chip=64, stride=64, preview=False)
    again = MeanScorer()
    res = make_map(scene, again, out, kind="values", chip=64, stride=32, batch_size=4, preview=False)
    assert res.resumed_at > 0 and again.chips == whole.chips - 12  # three batches of four were kept
    np.testing.assert_array_equal(_read(out)[0], _read(tmp_path / "whole.tif")[0])
    assert not (tmp_path / "m.tif.partial").exists()
    with pytest.raises(KeyboardInterrupt):
        make_map(scene, MeanScorer(fail_after=1), out, kind="values", chip=64, stride=64, batch_size=4,
                 preview=False)
    res = make_map(scene, MeanScorer(), out, kind="values", chip=64, stride=64, preview=False, restart=True)
    assert res.resumed_at == 0


def test_bad_settings_are_one_error(tmp_path: Path) -> None:
    scene, _ = utm_scene(tmp_path / "utm.tif")
    with pytest.raises(LandlensError, match="name it .tif"):
        make_map(scene, MeanScorer(), tmp_path / "m.png", kind="values", chip=64)
    with pytest.raises(LandlensError, match="smaller than one 512-pixel chip"):
        make_map(scene, MeanScorer(), tmp_path / "m.tif", kind="values", chip=512)
    with pytest.raises(LandlensError, match="one class name per output"):
        make_map(scene, NearestColour(), tmp_path / "m.tif", classes=["a"], chip=64)
    assert not any(tmp_path.glob("m.*"))


# --------------------------------------------------------------------------- a run and an archive


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from landlens.models.classifier import HeadConfig, build_classifier, save_classifier
    from landlens.models.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = build_classifier("resnet10t", CLASSES, HeadConfig("linear"), weights="none",
                             preprocessing=Preprocessing(input_size=48, crop_pct=0.875))
    with torch.no_grad():
        model.head.fc.weight.mul_(20.0)
    d = tmp_path_factory.mktemp("map_run")
    save_classifier(model, d)
    return d


def test_a_land_use_map_holds_the_run_s_prediction_of_each_chip(tmp_path: Path, run_dir: Path) -> None:
    from landlens.training.landuse import classify_scene
    from landlens.training.predict import Predictor

    scene, _ = utm_scene(tmp_path / "utm.tif")
    res = classify_scene(run_dir, scene, tmp_path / "lu.tif", chip=64, batch_size=5)
    got = _read(tmp_path / "lu.tif")[0][0]
    pred = Predictor(run_dir)
    for r in range(0, 256, 64):
        for c in range(0, 320, 64):
            if got[r // 64, c // 64] == NODATA_CLASS:
                assert (c, r) in {(0, 0), (256, 192)}  # the scene's two nodata corners
                continue
            chip = Image.fromarray(read_chip_rgb(ChipRef(str(scene), (c, r, 64, 64))))
            assert CLASSES[got[r // 64, c // 64]] == pred.predict_images([chip], top_k=1)[0].label
    assert res.scored == 18 and sum(c["cells"] for c in res.classes) == 18


def test_a_similarity_map_peaks_at_the_query_chip(tmp_path: Path) -> None:
    from landlens.retrieval.archive import Archive
    from landlens.retrieval.geo import similarity_map

    scene, _ = utm_scene(tmp_path / "utm.tif")
    arch = Archive.build_from_scenes([scene], tmp_path / "a.archive", chip=64, backbone="lbp_rgb", rerank=None,
                                     workers=0, progress=False)
    query = f"{scene}#window=128,64,64,64"
    res = similarity_map(arch, query, scene, tmp_path / "sim.tif")
    got = _read(tmp_path / "sim.tif")[0][0]
    assert got[1, 2] == pytest.approx(1.0, abs=1e-5) and np.nanargmax(got) == 1 * 5 + 2
    q = arch.embed([arch.load_query(query)])[0]
    other = arch.embed([Image.fromarray(read_chip_rgb(ChipRef(str(scene), (256, 0, 64, 64))))])[0]
    want = float(q @ other / np.linalg.norm(q) / np.linalg.norm(other))
    assert got[0, 4] == pytest.approx(want, abs=1e-5)
    assert res.cells == (5, 4) and Path(res.preview).is_file()


def test_cli_maps(tmp_path: Path, run_dir: Path) -> None:
    from landlens.cli.main import cli

    scene, _ = utm_scene(tmp_path / "utm.tif")
    run = CliRunner().invoke(cli, ["scenes", "classify", str(run_dir), str(scene), "--chip", "64", "--stride", "32",
                                   "--out", str(tmp_path / "lu.tif"), "--json", "-q"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    assert doc["cells"] == [10, 8] and Path(doc["table"]).is_file() and Path(doc["preview"]).is_file()
    bad = CliRunner().invoke(cli, ["scenes", "classify", str(tmp_path / "nope"), str(scene), "--out",
                                   str(tmp_path / "x.tif")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "nope" in bad.output
    arch = tmp_path / "a.archive"
    built = CliRunner().invoke(cli, ["index", "build", str(scene), "--chip", "64", "-b", "lbp_rgb", "--plain",
                                     "--workers", "0", "--out", str(arch)], catch_exceptions=False)
    assert built.exit_code == 0, built.output
    from landlens.scenes.reader import open_scene

    with open_scene(scene) as s:
        x, y = s.grid.transform[2] + 10 * 160, s.grid.transform[5] - 10 * 96  # centre of window (128, 64)
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(UTM["crs"], "EPSG:4326", always_xy=True).transform(x, y)
    sim = CliRunner().invoke(cli, ["scenes", "similarity", str(arch), f"@{lon},{lat}", str(scene), "--out",
                                   str(tmp_path / "sim.tif"), "-q"], catch_exceptions=False)
    assert sim.exit_code == 0, sim.output
    got = _read(tmp_path / "sim.tif")[0][0]
    assert got[1, 2] == pytest.approx(1.0, abs=1e-5)
