"""Augmentation presets: eval equivalence, shapes, exact dihedral views, nearest fill, pickling,
and the preview grid."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from landlens.training.augment import (
    AUGMENT_PRESETS,
    affine_nearest_fill,
    build_eval_transform,
    build_train_transform,
    denormalize_to_uint8,
    dihedral,
    preview_augment,
)
from landlens.errors import ConfigError
from landlens.models.preprocessing import Preprocessing, preprocess_images
from landlens.reports.figures import GRID_PAD, GRID_TITLE_PX

S = 24
PRE = Preprocessing(input_size=S)


def _image(h: int = 30, w: int = 41, seed: int = 0, low: int = 0) -> Image.Image:
    """An asymmetric RGB image: a gradient (so crops and flips change statistics) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + 2 * yy) * 255 / (w + 2 * h)], axis=-1)
    arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), low, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "pre",
    [
        PRE,
        Preprocessing(input_size=20, crop_pct=1.0, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)),
        Preprocessing(input_size=16, resize_mode="squash", channel_order="BGR", mean=(0.4, 0.5, 0.6)),
    ],
)
def test_eval_transform_equals_preprocess_images(pre: Preprocessing) -> None:
    img = _image()
    ref = preprocess_images([img], pre)[0]
    out = build_eval_transform(pre)(img)
    assert out.dtype == torch.float32 and out.shape == (3, pre.input_size, pre.input_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # "none" is the eval view as well
    torch.testing.assert_close(build_train_transform("none", pre)(img), ref, atol=1e-5, rtol=1e-5)


def test_eval_transform_converts_non_rgb_modes() -> None:
    gray = _image().convert("L")
    torch.testing.assert_close(build_eval_transform(PRE)(gray), preprocess_images([gray], PRE)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", [*AUGMENT_PRESETS, "color"])
@pytest.mark.parametrize("size", [(30, 41), (64, 17)])
def test_every_preset_shape_and_dtype(preset: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    out = build_train_transform(preset, PRE)(_image(*size))
    assert isinstance(out, torch.Tensor) and type(out) is torch.Tensor
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_color_is_an_alias_of_colour() -> None:
    img = _image()
    torch.manual_seed(3)
    a = build_train_transform("colour", PRE)(img)
    torch.manual_seed(3)
    b = build_train_transform("color", PRE)(img)
    assert torch.equal(a, b)


def test_dihedral_outputs_are_exactly_the_eight_symmetries() -> None:
    img = _image()
    ev = build_eval_transform(PRE)(img)
    views = [torch.rot90(ev, k, dims=(1, 2)) for k in range(4)]
    views += [v.flip(2) for v in views]
    # the eight views of an asymmetric image are distinct ...
    assert all(not torch.equal(views[i], views[j]) for i in range(8) for j in range(i))
    # ... and dihedral(x, k) enumerates them
    for k in range(8):
        assert torch.equal(dihedral(ev, k), views[k])
    t = build_train_transform("dihedral", PRE)
    torch.manual_seed(0)
    hits = []
    for _ in range(64):
        out = t(img)
        match = [k for k, v in enumerate(views) if torch.allclose(out, v, atol=1e-6, rtol=0)]
        assert len(match) == 1
        hits.append(match[0])
    assert set(hits) == set(range(8))  # every element occurs (uniform draw)


def test_affine_nearest_fill_hand_worked_cases() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)
    torch.testing.assert_close(affine_nearest_fill(x, 0.0, 0.0, 0.0), x, atol=1e-5, rtol=0)
    # shift by 2 pixels along x: out[..., j] = in[..., min(j + 2, 4)] (edge replicated)
    cols = [min(j + 2, 4) for j in range(5)]
    torch.testing.assert_close(affine_nearest_fill(x, 0.0, 2.0, 0.0), x[:, :, cols], atol=1e-4, rtol=0)
    rows = [max(i - 1, 0) for i in range(5)]
    torch.testing.assert_close(affine_nearest_fill(x, 0.0, 0.0, -1.0), x[:, rows, :], atol=1e-4, rtol=0)
    # a quarter turn of a square image is an exact rot90
    torch.testing.assert_close(affine_nearest_fill(x, np.pi / 2, 0.0, 0.0), torch.rot90(x, 1, dims=(1, 2)),
                               atol=1e-4, rtol=0)


def _corners(a: np.ndarray, k: int = 3) -> np.ndarray:
    return np.concatenate([a[:k, :k], a[:k, -k:], a[-k:, :k], a[-k:, -k:]]).reshape(-1, 3)


def test_geometric_fills_with_edge_pixels_not_black() -> None:
    img = _image(low=40)  # no pixel darker than 40
    assert np.asarray(img).min() >= 40
    t = build_train_transform("geometric", PRE)
    ev = denormalize_to_uint8(build_eval_transform(PRE)(img), PRE)
    torch.manual_seed(0)
    changed = 0
    for _ in range(30):
        out = denormalize_to_uint8(t(img), PRE)
        # bilinear blends of pixels >= 40 replicated at the border never go darker
        assert out.min() >= 39, out.min()
        assert _corners(out).min() >= 39
        changed += not np.array_equal(out, ev)
    assert changed >= 28
    # the check has teeth: a constant-fill affine (torchvision's default) leaves black corners
    torch.manual_seed(0)
    black = v2.Compose([v2.PILToTensor(), v2.RandomAffine(degrees=22, translate=(0.2, 0.2))])
    mins = [black(img.resize((S, S))).permute(1, 2, 0).numpy().min() for _ in range(30)]
    assert min(mins) == 0


def test_crop_flip_varies_with_the_seed() -> None:
    img = _image(60, 80)
    t = build_train_transform("crop-flip", PRE)
    means = []
    for seed in range(12):
        torch.manual_seed(seed)
        means.append(t(img).mean(dim=(1, 2)).numpy())
    means = np.stack(means)
    assert means.std(axis=0).min() > 0.05  # crops of a gradient image differ in mean colour
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    assert torch.equal(a, t(img))  # reproducible under the same seed
    assert not torch.allclose(a, build_eval_transform(PRE)(img))


def test_colour_changes_colour_but_keeps_geometry_of_a_flat_image() -> None:
    flat = Image.new("RGB", (30, 30), (120, 80, 40))
    t = build_train_transform("colour", PRE)
    torch.manual_seed(1)
    outs = [t(flat) for _ in range(10)]
    for o in outs:  # colour jitter is pointwise: a flat image stays flat
        assert o.std(dim=(1, 2)).max() < 1e-5
    assert np.std([float(o[0, 0, 0]) for o in outs]) > 0.05


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_transforms_are_picklable(preset: str) -> None:
    pre = Preprocessing(input_size=S, channel_order="BGR")
    t = build_train_transform(preset, pre)
    t2 = pickle.loads(pickle.dumps(t))
    img = _image()
    torch.manual_seed(7)
    a = t(img)
    torch.manual_seed(7)
    assert torch.equal(a, t2(img))
    pickle.dumps(build_eval_transform(pre))


def test_bad_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="mixup") as info:
        build_train_transform("mixup", PRE)
    msg = str(info.value)
    assert "\n" not in msg
    for name in AUGMENT_PRESETS:
        assert name in msg
    with pytest.raises(ConfigError):
        preview_augment([_image()], "bogus", PRE, "/nonexistent/x.png")


def test_preview_grid_size_content_and_seed(tmp_path) -> None:
    path_img = tmp_path / "scene.png"
    _image(50, 50, seed=1).save(path_img)
    images = [_image(), path_img]
    n = 4
    torch.manual_seed(123)
    state = torch.get_rng_state()
    out = preview_augment(images, "crop-flip", PRE, tmp_path / "p1.png", n_per_image=n, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert out == tmp_path / "p1.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == ((n + 1) * S + (n + 2) * GRID_PAD, 2 * S + 3 * GRID_PAD)
        grid = np.asarray(im.convert("RGB"))
    # first column is the eval view, de-normalised
    ev = denormalize_to_uint8(build_eval_transform(PRE)(_image()), PRE)
    assert np.array_equal(grid[GRID_PAD:GRID_PAD + S, GRID_PAD:GRID_PAD + S], ev)
    # same seed: identical pixels; another seed: different samples
    preview_augment(images, "crop-flip", PRE, tmp_path / "p2.png", n_per_image=n, seed=0)
    preview_augment(images, "crop-flip", PRE, tmp_path / "p3.png", n_per_image=n, seed=1)
    assert (tmp_path / "p1.png").read_bytes() == (tmp_path / "p2.png").read_bytes()
    assert (tmp_path / "p1.png").read_bytes() != (tmp_path / "p3.png").read_bytes()
    # titles add a caption band per row
    titled = preview_augment(images, "dihedral", PRE, tmp_path / "t.png", n_per_image=2, titles=["a", "b"])
    with Image.open(titled) as im:
        assert im.size == (3 * S + 4 * GRID_PAD, 2 * (S + GRID_TITLE_PX) + 3 * GRID_PAD)
