"""Decoding: every image kind gives the right shape, type and values; bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from fixtures.make_datasets import (
    BAD_KINDS,
    BOMB_SIDE,
    CMYK_COLOUR,
    PALETTE,
    RGBA_COLOUR,
    class_image,
    class_image_multiband,
    gray16_array,
    multiband16_array,
    write_image,
)
from PIL import Image

from landlens.data.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageInfo,
    is_image_file,
    load_rgb,
    probe_image,
    read_image,
)
from landlens.errors import ImageReadError, LandlensError


def _stretch(x: np.ndarray) -> np.ndarray:
    """Reference 2-98 percentile stretch of one band, computed in float64."""
    lo, hi = np.percentile(x.astype(np.float64), [2, 98])
    return np.clip(np.round((x - lo) / (hi - lo) * 255), 0, 255)


def _close(a: np.ndarray, b: np.ndarray, tol: int) -> None:
    diff = np.abs(a.astype(np.int64) - np.asarray(b).astype(np.int64))
    assert diff.max() <= tol, f"max difference {diff.max()} > {tol}"


# ----------------------------------------------------------------- image kinds


def test_gray16_png_reads_back_exactly(image_kinds: dict[str, Path]) -> None:
    arr = read_image(image_kinds["gray16_png"])
    assert arr.dtype == np.uint16 and arr.shape == (24, 20, 1)
    np.testing.assert_array_equal(arr[..., 0], gray16_array())
    rgb = np.asarray(load_rgb(image_kinds["gray16_png"]))
    assert rgb.shape == (24, 20, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    _close(rgb[..., 0], _stretch(gray16_array()), 1)


def test_multiband16_planar_tiff(image_kinds: dict[str, Path]) -> None:
    arr = read_image(image_kinds["multiband16_tif"])
    assert arr.dtype == np.uint16 and arr.shape == (24, 20, 5)
    np.testing.assert_array_equal(arr, multiband16_array())
    ref = multiband16_array()
    rgb = np.asarray(load_rgb(image_kinds["multiband16_tif"]))  # default: first three bands
    for c in range(3):
        _close(rgb[..., c], _stretch(ref[..., c]), 1)
    fixed = np.asarray(load_rgb(image_kinds["multiband16_tif"], rgb_bands=(4, 3, 2), scale=10000))
    expected = np.clip(np.round(ref[..., [4, 3, 2]] * 255.0 / 10000), 0, 255)
    _close(fixed, expected, 1)


def test_palette_png_expands_through_palette(image_kinds: dict[str, Path]) -> None:
    yy, xx = np.mgrid[0:16, 0:16]
    expected = PALETTE[(xx + yy) % 4]
    np.testing.assert_array_equal(read_image(image_kinds["palette_png"]), expected)
    np.testing.assert_array_equal(np.asarray(load_rgb(image_kinds["palette_png"])), expected)


def test_rgba_png_composited_on_black(image_kinds: dict[str, Path]) -> None:
    arr = read_image(image_kinds["rgba_png"])
    assert arr.shape == (16, 16, 4)
    alpha = 17 * np.arange(16)
    np.testing.assert_array_equal(arr[0, :, 3], alpha)
    rgb = np.asarray(load_rgb(image_kinds["rgba_png"]))
    expected = np.round(np.array(RGBA_COLOUR)[None, None, :] * alpha[None, :, None] / 255.0)
    _close(rgb, np.broadcast_to(expected, (16, 16, 3)), 1)
    assert (rgb[:, 0] == 0).all() and (rgb[:, -1] == RGBA_COLOUR).all()


def test_cmyk_jpeg_converts_to_rgb(image_kinds: dict[str, Path]) -> None:
    c, m, y, k = CMYK_COLOUR
    expected = [(255 - v) * (255 - k) / 255.0 for v in (c, m, y)]  # independent formula
    rgb = np.asarray(load_rgb(image_kinds["cmyk_jpg"]))
    assert rgb.shape == (16, 16, 3)
    _close(rgb, np.broadcast_to(np.round(expected), rgb.shape), 3)
    assert read_image(image_kinds["cmyk_jpg"]).shape == (16, 16, 3)


def test_grayscale_jpeg(image_kinds: dict[str, Path]) -> None:
    arr = read_image(image_kinds["gray_jpg"])
    assert arr.shape == (32, 32, 1) and arr.dtype == np.uint8
    rgb = np.asarray(load_rgb(image_kinds["gray_jpg"]))
    assert rgb.shape == (32, 32, 3)
    assert (rgb[..., 0] == rgb[..., 2]).all()
    _close(rgb[..., 0], np.tile(np.linspace(0, 255, 32), (32, 1)), 4)


def test_odd_size_jpeg(image_kinds: dict[str, Path]) -> None:
    assert read_image(image_kinds["odd_size_jpg"]).shape == (256, 247, 3)
    assert load_rgb(image_kinds["odd_size_jpg"]).size == (247, 256)


def test_lzw_tiff_falls_back_to_pillow(image_kinds: dict[str, Path]) -> None:
    arr = read_image(image_kinds["lzw_tif"])
    np.testing.assert_array_equal(arr, class_image(1, 0, (20, 12)))  # lossless
    np.testing.assert_array_equal(np.asarray(load_rgb(image_kinds["lzw_tif"])), arr)


def test_float_tiff(image_kinds: dict[str, Path]) -> None:
    arr = read_image(image_kinds["float_tif"])
    ref = np.linspace(0.0, 0.5, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, ref)
    rgb = np.asarray(load_rgb(image_kinds["float_tif"]))
    for c in range(3):
        _close(rgb[..., c], _stretch(ref[..., c]), 1)


def test_eurosat_ms_13_bands_use_b04_b03_b02_over_3000(tmp_path: Path) -> None:
    ref = class_image_multiband(2, 0, (16, 12))
    path = tmp_path / "SeaLake_1.tif"
    write_image(path, ref)
    arr = read_image(path)
    assert arr.shape == (12, 16, 13) and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, ref)
    expected = np.clip(np.round(ref[..., [3, 2, 1]] * 255.0 / 3000), 0, 255)
    _close(np.asarray(load_rgb(path)), expected, 1)
    custom = np.asarray(load_rgb(path, rgb_bands=[7, 3, 2], scale=6000))
    _close(custom, np.clip(np.round(ref[..., [7, 3, 2]] * 255.0 / 6000), 0, 255), 1)


def test_contiguous_multiband_tiff(tmp_path: Path) -> None:
    ref = multiband16_array()
    tifffile.imwrite(tmp_path / "c.tif", ref, photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), ref)


def test_rgb_jpeg_matches_pillow(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.fromarray(class_image(3, 1, (40, 30))).save(path, quality=95)
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(read_image(path), ref)
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), ref)


def test_rgb_bands_validation(image_kinds: dict[str, Path]) -> None:
    with pytest.raises(ImageReadError, match="rgb_bands"):
        load_rgb(image_kinds["multiband16_tif"], rgb_bands=(0, 1, 9))
    gray = np.asarray(load_rgb(image_kinds["multiband16_tif"], rgb_bands=[4]))
    assert (gray[..., 0] == gray[..., 1]).all()


def test_dataset_wide_rgb_bands_fit_odd_images(image_kinds: dict[str, Path]) -> None:
    """rgb_bands=(0, 1, 2), as a catalog gives it, still accepts gray and RGBA scenes."""
    for kind in ("gray_jpg", "gray16_png", "rgba_png", "palette_png", "cmyk_jpg"):
        np.testing.assert_array_equal(
            np.asarray(load_rgb(image_kinds[kind], rgb_bands=(0, 1, 2))),
            np.asarray(load_rgb(image_kinds[kind])),
        )


# ----------------------------------------------------------------------- draft


@pytest.mark.parametrize(
    ("draft", "expected"),
    [
        ((100, 100), (128, 128)),
        ((64, 64), (64, 64)),
        ((200, 60), (256, 256)),
        ((300, 300), (256, 256)),
    ],
)
def test_jpeg_draft_never_below_requested(
    tmp_path: Path, draft: tuple[int, int], expected: tuple[int, int]
) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(class_image(0, 0, (256, 256))).save(path, quality=90)
    im = load_rgb(path, draft_size=draft)
    assert im.mode == "RGB" and im.size == expected
    assert im.size[0] >= min(draft[0], 256) and im.size[1] >= min(draft[1], 256)


def test_draft_ignored_for_png(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(class_image(0, 0, (256, 256))).save(path)
    assert load_rgb(path, draft_size=(64, 64)).size == (256, 256)


# ------------------------------------------------------------------- bad files

EXPECTED_REASON = {
    "empty": "empty file",
    "not_image": "not an image (unrecognised format)",
    "truncated": "truncated image data",
    "corrupt": "corrupt image data",
    "bomb": f"image too large: {BOMB_SIDE}x{BOMB_SIDE} pixels exceeds the limit of "
    f"{DEFAULT_MAX_PIXELS} (--max-pixels)",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("reader", [read_image, load_rgb], ids=["read_image", "load_rgb"])
def test_bad_files_raise_image_read_error(bad_files: dict[str, Path], kind: str, reader) -> None:  # noqa: ANN001
    path = bad_files[kind]
    with pytest.raises(ImageReadError) as info:
        reader(path)
    err = info.value
    assert isinstance(err, LandlensError)
    assert err.path == str(path) and path.name in str(err)
    assert err.reason.startswith(EXPECTED_REASON[kind])
    assert "\n" not in str(err)


def test_probe_reads_header_only(bad_files: dict[str, Path], image_kinds: dict[str, Path]) -> None:
    assert probe_image(bad_files["bomb"]) == ImageInfo(BOMB_SIDE, BOMB_SIDE, 1, "uint8", "PNG")
    assert probe_image(image_kinds["gray16_png"]) == ImageInfo(20, 24, 1, "uint16", "PNG")
    assert probe_image(image_kinds["multiband16_tif"]) == ImageInfo(20, 24, 5, "uint16", "TIFF")
    assert probe_image(image_kinds["palette_png"]).bands == 3
    assert probe_image(image_kinds["rgba_png"]).bands == 4
    assert probe_image(image_kinds["odd_size_jpg"]) == ImageInfo(247, 256, 3, "uint8", "JPEG")
    for kind in ("empty", "not_image"):
        with pytest.raises(ImageReadError, match=EXPECTED_REASON[kind].split(" (")[0]):
            probe_image(bad_files[kind])


def test_custom_max_pixels(image_kinds: dict[str, Path]) -> None:
    with pytest.raises(
        ImageReadError, match=r"247x256 pixels exceeds the limit of 1000 \(--max-pixels\)"
    ):
        read_image(image_kinds["odd_size_jpg"], max_pixels=1000)
    with pytest.raises(ImageReadError, match="24 pixels exceeds the limit of 100"):
        read_image(image_kinds["multiband16_tif"], max_pixels=100)  # tifffile path
    assert read_image(image_kinds["odd_size_jpg"], max_pixels=247 * 256).shape[:2] == (256, 247)


def test_our_limit_replaces_pillows(
    image_kinds: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow would refuse 247x256
    assert load_rgb(image_kinds["odd_size_jpg"]).size == (247, 256)
    assert Image.MAX_IMAGE_PIXELS == 50  # restored after the call


def test_missing_and_non_regular_paths(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_rgb(tmp_path)


def test_truncated_and_garbage_tiff(tmp_path: Path) -> None:
    full = tmp_path / "full.tif"
    tifffile.imwrite(
        full,
        np.moveaxis(multiband16_array(), -1, 0),
        planarconfig="separate",
        photometric="minisblack",
    )
    data = full.read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated image data"):
        read_image(tmp_path / "half.tif")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\x00" * 60)
    with pytest.raises(ImageReadError, match="junk.tif: (corrupt image data|not an image)"):
        read_image(tmp_path / "junk.tif")


def test_image_extensions() -> None:
    for ext in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"):
        assert ext in IMAGE_EXTENSIONS
    assert is_image_file("a/B.JPG") and is_image_file("x.TiF")
    assert not is_image_file("notes.txt") and not is_image_file("archive.zip")
