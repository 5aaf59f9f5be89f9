"""Reading scenes: chip windows, the pixels of a chip through every image reader, nodata,
resampling to a GSD, and reads that never cover more than one chip's window."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fixtures.scenes import GEOGRAPHIC, geographic_scene, mercator_scene, utm_scene
from landlens.data.io import file_problem, load_rgb, probe_image, read_image
from landlens.errors import ImageReadError, LandlensError
from landlens.models.preprocessing import Preprocessing, decode_image, load_resized
from landlens.scenes import reader as reader_module
from landlens.scenes.reader import Scene
from landlens.scenes.tiling import chip_windows, tile_scene


@pytest.fixture(scope="module")
def utm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return utm_scene(tmp_path_factory.mktemp("utm") / "utm.tif")


@pytest.fixture(scope="module")
def merc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return mercator_scene(tmp_path_factory.mktemp("merc") / "drone.tif")


def _stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The documented mapping, in float64 here (the reader works in float32)."""
    return np.clip(np.rint((x.astype(np.float64) - lo) * 255.0 / (hi - lo)), 0, 255)


# --------------------------------------------------------------------------- windows


def test_windows_cover_the_grid_with_a_last_window_flush_to_each_edge() -> None:
    wins = chip_windows(320, 256, 64)
    assert len(wins) == 20 and wins[0] == (0, 0, 64, 64) and wins[-1] == (256, 192, 64, 64)
    cols = sorted({w[0] for w in chip_windows(300, 64, 64, 64)})
    assert cols == [0, 64, 128, 192, 236]  # 236 + 64 = 300: flush with the edge
    rows = sorted({w[1] for w in chip_windows(64, 200, 64, 48)})
    assert rows == [0, 48, 96, 136]
    assert chip_windows(63, 400, 64) == []  # narrower than one chip
    with pytest.raises(LandlensError):
        chip_windows(100, 100, 0)


# --------------------------------------------------------------------------- pixels


def test_a_chip_of_a_16_bit_scene_is_its_window_stretched_by_the_scene_percentiles(utm) -> None:
    path, data = utm
    valid = (data != 0).any(0)
    stretch = [(float(np.percentile(b[valid], 2)), float(np.percentile(b[valid], 98))) for b in data]
    ref = f"{path}#window=128,64,64,32"  # hand-written: bands, stretch default
    rgb = np.asarray(load_rgb(ref))
    assert rgb.shape == (32, 64, 3)
    want = np.stack([_stretch(data[b, 64:96, 128:192], *stretch[b]) for b in range(3)], -1)
    assert np.abs(rgb.astype(int) - want).max() <= 1  # float32 vs float64 rounding at .5
    assert (rgb == want).mean() > 0.99
    # the samples themselves, and the header
    assert np.array_equal(read_image(ref), data[:, 64:96, 128:192].transpose(1, 2, 0))
    info = probe_image(ref)
    assert (info.width, info.height, info.bands, info.dtype) == (64, 32, 3, "uint16")


def test_the_stretch_is_the_scenes_not_the_chips(utm) -> None:
    path, _ = utm
    tiles = tile_scene(path, chip=64)
    stretch = tiles.chips[0].ref.stretch
    for chip in tiles.chips:
        assert chip.ref.stretch == stretch  # one stretch per scene, written in every reference
    with Scene(path) as sc:
        assert sc.stretch == stretch


def test_bands_are_counted_from_one_and_one_band_is_gray(utm) -> None:
    path, data = utm
    rgb = np.asarray(load_rgb(f"{path}#window=64,64,16,16&bands=3,2,1&stretch=none"))
    assert np.array_equal(rgb, np.clip(data[[2, 1, 0], 64:80, 64:80], 0, 255).transpose(1, 2, 0))
    gray = np.asarray(load_rgb(f"{path}#window=64,64,16,16&bands=2&stretch=0:4000"))
    assert np.array_equal(gray[..., 0], gray[..., 2])
    assert np.abs(gray[..., 0].astype(int) - _stretch(data[1, 64:80, 64:80], 0, 4000)).max() <= 1
    with pytest.raises(ImageReadError, match="band 4 does not exist: the scene has 3"):
        load_rgb(f"{path}#window=0,0,16,16&bands=4,2,1")


def test_an_8_bit_scene_is_read_as_it_is(merc) -> None:
    path, data = merc
    rgb = np.asarray(load_rgb(f"{path}#window=40,8,48,24"))
    assert np.array_equal(rgb, data[:, 8:32, 40:88].transpose(1, 2, 0))


def test_the_one_decode_path_reads_chips(utm) -> None:
    path, _ = utm
    ref = f"{path}#window=128,128,64,64"
    pre = Preprocessing(input_size=32, crop_pct=1.0)
    img = decode_image(ref, pre, rgb_bands=(0, 1, 2))  # an archive's bands do not apply to a chip
    assert np.array_equal(np.asarray(img), np.asarray(load_rgb(ref)))
    assert load_resized(ref, pre).shape == (32, 32, 3)


def test_the_size_limit_applies_to_the_chip_not_the_scene(utm) -> None:
    path, _ = utm  # 320 x 256 pixels, far above the limit below
    assert load_rgb(f"{path}#window=0,64,64,64", max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageReadError, match="image too large"):
        load_rgb(f"{path}#window=0,64,128,64", max_pixels=64 * 64)


def test_problems_are_one_line_naming_the_chip(utm, tmp_path: Path) -> None:
    path, _ = utm
    missing = f"{tmp_path}/nope.tif#window=0,0,8,8"
    assert file_problem(missing) == "file not found"
    with pytest.raises(ImageReadError, match="nope.tif#window=0,0,8,8: scene .*file not found"):
        load_rgb(missing)
    with pytest.raises(ImageReadError, match="outside the scene's chip grid") as err:
        load_rgb(f"{path}#window=300,0,64,64")
    assert err.value.path.endswith("#window=300,0,64,64")
    not_raster = tmp_path / "text.tif"
    not_raster.write_text("hello")
    with pytest.raises(ImageReadError, match="cannot read the scene"):
        load_rgb(f"{not_raster}#window=0,0,1,1")
    plain = tmp_path / "plain.tif"
    import tifffile

    tifffile.imwrite(plain, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ImageReadError, match="no coordinate reference system"):
        tile_scene(plain, chip=4)


# --------------------------------------------------------------------------- nodata


def test_chips_mostly_without_data_are_skipped_and_the_rest_is_black(utm) -> None:
    path, data = utm
    tiles = tile_scene(path, chip=64)
    windows = {c.window for c in tiles.chips}
    assert (0, 0, 64, 64) not in windows  # all nodata
    assert (256, 192, 64, 64) not in windows  # 24 of its 64 rows hold data
    assert len(tiles.chips) == 18 and tiles.skipped == 2
    assert {c.window: c.valid for c in tiles.chips}[(192, 192, 64, 64)] == 1.0
    more = tile_scene(path, chip=64, min_valid=0.3)
    assert len(more.chips) == 19 and {c.window: c.valid for c in more.chips}[(256, 192, 64, 64)] == 24 / 64
    # a chip straddling the nodata corner: its nodata pixels are black, the rest as stretched
    rgb = np.asarray(load_rgb(f"{path}#window=32,32,64,64"))
    assert (rgb[:32, :32] == 0).all() and (rgb[32:, 32:] > 0).any()


def test_a_nodata_value_for_a_file_that_declares_none(merc) -> None:
    path, data = merc  # black 40 x 40 top-left corner, no declared nodata
    assert len(tile_scene(path, chip=32).chips) == 48  # without --nodata every chip holds data
    tiles = tile_scene(path, chip=32, nodata=0)
    valid = {c.window: c.valid for c in tiles.chips}
    assert (0, 0, 32, 32) not in valid and len(tiles.chips) == 47
    assert valid[(32, 0, 32, 32)] == valid[(0, 32, 32, 32)] == 1 - 8 * 32 / 1024
    assert valid[(32, 32, 32, 32)] == 1 - 8 * 8 / 1024 and valid[(64, 0, 32, 32)] == 1.0
    assert tiles.chips[0].ref.nodata == 0.0 and "nodata=0" in str(tiles.chips[0].ref)
    rgb = np.asarray(load_rgb(str(tiles.chips[0].ref)))  # (32, 0): its black columns stay black
    assert (rgb[:, :8] == 0).all() and np.array_equal(rgb[:, 8:], data[:, :32, 40:64].transpose(1, 2, 0))


# --------------------------------------------------------------------------- resampling


def test_resampling_to_a_coarser_gsd_averages_the_pixels(merc) -> None:
    path, data = merc  # 0.5 m pixels
    with Scene(path, gsd=1.0) as sc:
        assert (sc.grid.width, sc.grid.height) == (128, 96)
        assert sc.resampling == "average"
        assert sc.grid.transform == (1.0, 0.0, 13_467_532.0, 0.0, -1.0, 1_632_019.0)
    ref = f"{path}#window=32,16,32,24&gsd=1"
    rgb = np.asarray(load_rgb(ref)).astype(float)
    block = data[:, 32:80, 64:128].astype(float).reshape(3, 24, 2, 32, 2).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert rgb.shape == (24, 32, 3)
    assert np.abs(rgb - block).max() <= 1.0  # GDAL's average, rounded
    tiles = tile_scene(path, chip=32, gsd=1.0)
    assert {c.window for c in tiles.chips} == set(chip_windows(128, 96, 32))
    assert "gsd=1&resampling=average" in str(tiles.chips[0].ref)


def test_the_same_gsd_as_the_scene_reads_its_own_grid(utm) -> None:
    path, data = utm
    with Scene(path, gsd=10) as sc:
        assert (sc.grid.width, sc.grid.height) == (320, 256) and sc.resampling is None
    assert np.array_equal(read_image(f"{path}#window=64,64,8,8&gsd=10"), data[:, 64:72, 64:72].transpose(1, 2, 0))


def test_a_gsd_on_a_geographic_scene_is_in_metres_at_its_centre(tmp_path: Path) -> None:
    path, _ = geographic_scene(tmp_path / "geo.tif")  # 160 x 128 pixels of 1e-4 degrees
    lat = GEOGRAPHIC["origin"][1] - 64 * 1e-4
    metre = 6_371_008.8 * math.pi / 180
    px, py = 20.0 / (metre * math.cos(math.radians(lat))), 20.0 / metre
    with Scene(path, gsd=20) as sc:
        assert sc.grid.width == math.floor(160 * 1e-4 / px) and sc.grid.height == math.floor(128 * 1e-4 / py)
        assert sc.grid.transform[0] == pytest.approx(px, rel=1e-12)
        assert sc.bands == (1, 2, 3)  # of R, G, B, NIR


# --------------------------------------------------------------------------- memory


class _Reads:
    """Every read of pixels or masks rasterio is asked for: ``(window size, out_shape)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import rasterio.io
        import rasterio.vrt

        self.calls: list[tuple[tuple[int, int] | None, tuple[int, ...] | None]] = []
        for cls in (rasterio.io.DatasetReader, rasterio.vrt.WarpedVRT):
            for name in ("read", "read_masks"):
                monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name)), raising=True)

    def _wrap(self, fn):  # noqa: ANN001, ANN202
        def wrapped(ds, *args, **kwargs):  # noqa: ANN001, ANN202
            win = kwargs.get("window")
            shape = kwargs.get("out_shape")
            self.calls.append(((int(win.width), int(win.height)) if win is not None else None,
                               tuple(shape) if shape is not None else None))
            return fn(ds, *args, **kwargs)

        return wrapped


def test_reading_is_windowed_never_more_than_one_chip(utm, merc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_module, "STATS_SIDE", 40)  # the scenes are larger: the stats read is decimated
    reader_module._stats_cache.clear()  # noqa: SLF001 - a fresh process
    reads = _Reads(monkeypatch)
    tiles = [tile_scene(utm[0], chip=64, stride=32), tile_scene(merc[0], chip=16, gsd=1.0, nodata=0)]
    for t in tiles:
        for c in t.chips:
            load_rgb(str(c.ref))
    assert len(reads.calls) > 100
    for window, shape in reads.calls:
        if window is None:  # the one scene-wide read: decimated to STATS_SIDE
            assert shape is not None and max(shape[-2:]) <= 40
        else:
            assert window[0] <= 64 and window[1] <= 64
    assert sum(1 for w, _ in reads.calls if w is None) <= 4  # pixels and mask, once per scene
