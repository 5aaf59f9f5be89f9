"""Hand-crafted descriptors (HOG, LBP-RGB) against scikit-image, and as registry backbones."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from fixtures.make_datasets import make_folder_dataset
from PIL import Image

from landlens.errors import BackboneError, WeightsError
from landlens.features import cache as cache_mod
from landlens.features.extract import extract_features, optimize_for_inference
from landlens.models.handcrafted import HOG, LBPRGB, HandcraftedBackbone, lbp_uniform_codes
from landlens.features.store import FeatureStore
from landlens.models.preprocessing import Preprocessing, normalize_batch
from landlens.models.registry import create_backbone, get_spec, list_backbones

import skimage.feature as skimage_feature  # noqa: E402 - the reference implementation ([test] extra)

UNIT = Preprocessing(input_size=64, resize_mode="squash", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 RGB with smooth structure, noise, and flat patches (LBP ties, zero gradients)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 90 * np.sin(xx / (3.0 + seed) + yy / 7.0)
    img = base[..., None] * np.array([1.0, 0.8, 0.5]) + rng.integers(-25, 25, (h, w, 3))
    img[h // 8: h // 3, w // 5: w // 2] = (200, 90, 40)
    img[h // 2: h // 2 + 6, :] = 77
    return np.clip(img, 0, 255).astype(np.uint8)


def _batch(images: list[np.ndarray], pre: Preprocessing = UNIT) -> torch.Tensor:
    return normalize_batch(torch.from_numpy(np.stack(images)), pre)


def _skimage_hog(img: np.ndarray) -> np.ndarray:
    # BT.601 luma in exact integer arithmetic (as the module forms it): mathematically equal
    # lumas stay equal, so neither side sees a spurious 1e-17 gradient
    gray = (img.astype(np.int64) @ np.array([299, 587, 114])) / 255000.0
    return skimage_feature.hog(gray, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2),
                               block_norm="L2-Hys", feature_vector=True)


def _skimage_lbp_rgb(img: np.ndarray, grid: int = 1) -> np.ndarray:
    h, w = img.shape[:2]
    out = []
    for rows in np.array_split(np.arange(h), grid):
        for cols in np.array_split(np.arange(w), grid):
            for c in range(3):
                codes = skimage_feature.local_binary_pattern(img[:, :, c], P=8, R=1, method="uniform")
                region = codes[np.ix_(rows, cols)].astype(int).ravel()
                out.append(np.bincount(region, minlength=10) / region.size)
    return np.concatenate(out)


# ------------------------------------------------------------------ HOG


@pytest.mark.parametrize("shape", [(64, 64), (70, 52)])
def test_hog_matches_skimage(shape):
    images = [_image(*shape, seed=s) for s in range(3)]
    got = HOG()(_batch(images)).numpy()
    for img, row in zip(images, got):
        ref = _skimage_hog(img)
        assert row.shape == ref.shape
        # float32 against skimage's float64: observed differences ~1e-7
        np.testing.assert_allclose(row, ref, rtol=0, atol=2e-6)
    assert got.shape == (3, (shape[0] // 8 - 1) * (shape[1] // 8 - 1) * 36)


def test_hog_orientation_binning_hand_worked():
    # a ramp along the diagonal: every interior gradient points at 45 degrees with magnitude
    # 2 * step * sqrt(2) ([-1, 0, 1] in both directions)
    step = 1.0 / 256
    yy, xx = np.mgrid[0:32, 0:32]
    x = torch.from_numpy(((xx + yy) * step).astype(np.float32))[None, None].expand(1, 3, 32, 32)
    m = 2 * step * np.sqrt(2)
    hard = HOG(levels=None).cell_histograms(x)[0, :, 1, 1].numpy()  # an interior cell
    expected = np.zeros(9)
    expected[2] = m  # 45 lies in [40, 60)
    np.testing.assert_allclose(hard, expected, rtol=1e-5, atol=1e-9)
    linear = HOG(levels=None, binning="linear").cell_histograms(x)[0, :, 1, 1].numpy()
    # bin centres 30 and 50: 45 is 3/4 of the way from 30 to 50
    expected = np.zeros(9)
    expected[1], expected[2] = 0.25 * m, 0.75 * m
    np.testing.assert_allclose(linear, expected, rtol=1e-5, atol=1e-9)


def test_hog_linear_binning_wraps_around():
    # a vertical ramp gives 90 degrees; a horizontal one 0 degrees, which is halfway between
    # the centres 170 (bin 8) and 10 (bin 0)
    ramp = torch.arange(32, dtype=torch.float32) / 256
    x = ramp.view(1, 1, 1, 32).expand(1, 3, 32, 32)
    cell = HOG(levels=None, binning="linear").cell_histograms(x)[0, :, 1, 1].numpy()
    m = 2.0 / 256
    assert cell[0] == pytest.approx(0.5 * m, rel=1e-5) and cell[8] == pytest.approx(0.5 * m, rel=1e-5)
    assert np.abs(cell[1:8]).max() == 0


# ------------------------------------------------------------------ LBP


@pytest.mark.parametrize("points,radius", [(8, 1.0), (16, 2.0)])
def test_lbp_codes_equal_skimage(points, radius):
    img = _image(40, 33, seed=4)
    for c in range(3):
        ref = skimage_feature.local_binary_pattern(img[:, :, c], P=points, R=radius, method="uniform")
        got = lbp_uniform_codes(torch.from_numpy(img[:, :, c].astype(np.float64)), points, radius).numpy()
        np.testing.assert_array_equal(got, ref.astype(np.int64))
    # the image has ties (flat patches) and non-uniform patterns, so the test bites
    assert (ref == points + 1).any() and (ref == points).any()


@pytest.mark.parametrize("grid", [1, 2])
def test_lbp_rgb_histograms_match_skimage(grid):
    images = [_image(48, 48, seed=s) for s in range(3)]
    got = LBPRGB(grid=grid)(_batch(images)).numpy()
    assert got.shape == (3, grid * grid * 30)
    for img, row in zip(images, got):
        np.testing.assert_allclose(row, _skimage_lbp_rgb(img, grid), rtol=0, atol=1e-7)
        np.testing.assert_allclose(row.reshape(-1, 10).sum(1), 1.0, atol=1e-6)


# ------------------------------------------------------------------ as backbones


def test_backbone_dims_and_identity():
    expected = {"hog": (128, 8100), "lbp_rgb": (256, 30), "lbp_rgb_g2": (256, 120)}
    names = {s.name for s in list_backbones()}
    digests = set()
    for name, (size, dim) in expected.items():
        assert name in names
        bb = create_backbone(name)
        assert isinstance(bb, HandcraftedBackbone)
        assert bb.preprocessing.input_size == size and bb.num_features == dim
        assert bb.weights.source == "builtin" and bb.weights.ref == f"{name}-v1"
        settings = json.dumps(bb.body.settings(), sort_keys=True).encode()
        assert bb.weights.digest == hashlib.sha256(settings).hexdigest()
        assert create_backbone(name, "none").weights == bb.weights
        digests.add(bb.weights.digest)
        x = _batch([_image(size, size, seed=0), _image(size, size, seed=1)], bb.preprocessing)
        with torch.inference_mode():
            assert bb(x).shape == (2, dim)
    assert len(digests) == 3
    assert get_spec("lbp").name == "lbp_rgb"


def test_num_features_follows_input_size():
    bb = create_backbone("hog")
    bb.preprocessing = bb.preprocessing.replace(input_size=64)  # what --input-size does
    assert bb.num_features == 7 * 7 * 36
    with torch.inference_mode():
        assert bb(_batch([_image(64, 64, 0)], bb.preprocessing)).shape == (1, 7 * 7 * 36)
    bb.preprocessing = bb.preprocessing.replace(input_size=8)
    with pytest.raises(BackboneError, match="at least 16 px"):
        _ = bb.num_features


@pytest.mark.parametrize("name", ["hog", "lbp_rgb"])
def test_normalisation_is_undone(name):
    """Under ImageNet mean/std and BGR order the descriptor sees the same pixels."""
    images = [_image(64, 64, seed=s) for s in range(2)]
    plain = create_backbone(name, preprocessing=UNIT)
    other = UNIT.replace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order="BGR")
    imagenet = create_backbone(name, preprocessing=other)
    with torch.inference_mode():
        a = plain(_batch(images, UNIT))
        b = imagenet(_batch(images, other))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    plain.preprocessing = other  # replacing the preprocessing later re-targets the body too
    with torch.inference_mode():
        torch.testing.assert_close(plain(_batch(images, other)), a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["hog", "lbp_rgb_g2"])
def test_batch_independence(name):
    bb = create_backbone(name, preprocessing=UNIT)
    images = [_image(64, 64, seed=s) for s in range(4)]
    with torch.inference_mode():
        together = bb(_batch(images))
        for i, img in enumerate(images):
            alone = bb(_batch([img]))[0]
            torch.testing.assert_close(together[i], alone, rtol=0, atol=1e-7)
        # and another batch around image 0 does not change it either
        swapped = bb(_batch([images[0], _image(64, 64, seed=9)]))[0]
    torch.testing.assert_close(together[0], swapped, rtol=0, atol=1e-7)


@pytest.mark.parametrize("weights", ["hub", "hub:in1k", "package", "file:/nowhere/w.pth", "w.safetensors"])
def test_other_weight_sources_are_one_line_errors(weights):
    with pytest.raises(WeightsError) as info:
        create_backbone("hog", weights)
    msg = str(info.value)
    assert "\n" not in msg and "'hog'" in msg and "no weights" in msg


def test_jit_graph_equals_eager():
    bb = create_backbone("lbp_rgb", preprocessing=UNIT)
    x = _batch([_image(64, 64, seed=s) for s in range(3)])
    fast = optimize_for_inference(bb, x, "jit")
    assert fast is not bb
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), bb(x), rtol=0, atol=0)


# ------------------------------------------------------------------ end to end


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("name,size", [("hog", 128), ("lbp_rgb", 256)])
def test_extract_features_end_to_end(tmp_path, name, size):
    from landlens.data.folder import scan_folder

    # PNG images at the descriptor's input size: no resize, so skimage sees the same pixels
    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=2, ext=".png", size=size)
    ds = scan_folder(data)
    bb = create_backbone(name)
    res = extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, tmp_path / "store", batch_size=3,
                           workers=0, progress=False, optimize="auto")
    fs = FeatureStore(res.store).load()
    assert fs.valid.all() and fs.features.shape == (4, bb.num_features)
    assert fs.meta["identity"]["weights_digest"] == bb.weights.digest
    for i in range(len(ds)):
        img = _pixels(ds.absolute_path(i))
        ref = _skimage_hog(img) if name == "hog" else _skimage_lbp_rgb(img)
        np.testing.assert_allclose(fs.features[i], ref, rtol=0, atol=2e-6)


def test_cached_features_accept_descriptors(tmp_path, monkeypatch):
    data = make_folder_dataset(tmp_path / "d", ["a", "b", "c"], per_class=2, ext=".png", size=40)
    # weights='none' still gives a digest (of the settings), which the cache requires
    bb = create_backbone("lbp_rgb", "none", preprocessing=UNIT)  # 64 px keeps the test fast
    first = cache_mod.cached_features(data, backbone=bb, cache_dir=tmp_path / "c", workers=0, progress=False)
    assert first.features.shape == (6, 30)
    for path, row in zip(first.paths, first.features):
        img = np.asarray(Image.open(data / path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
        np.testing.assert_allclose(row, _skimage_lbp_rgb(img), rtol=0, atol=1e-7)

    def no_extraction(*a, **k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(cache_mod, "extract_features", no_extraction)
    again = cache_mod.cached_features(data, backbone=create_backbone("lbp_rgb", "auto", preprocessing=UNIT),
                                      cache_dir=tmp_path / "c", workers=0, progress=False)
    np.testing.assert_array_equal(again.features, first.features)
    # the name path builds the same identity (no weights to fetch, nothing refused)
    lbp = create_backbone("lbp_rgb", "none")
    assert cache_mod.store_path(tmp_path / "c", "x", [], [], lbp, tmp_path).name.startswith(
        f"lbp_rgb-{bb.weights.digest[:12]}-")
