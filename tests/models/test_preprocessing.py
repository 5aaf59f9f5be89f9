"""Preprocessing: resize rules and normalisation against torchvision's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from landlens.models.preprocessing import Preprocessing, normalize_batch, preprocess_images, resize_and_crop


def _img(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(256, 256), (247, 256), (249, 256), (256, 253), (600, 400), (401, 600)])
def test_crop_mode_matches_torchvision(size):
    pre = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bilinear")
    img = _img(*size)
    ours = preprocess_images([img], pre)
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(pre.mean, pre.std)])(img)[None]
    assert ours.shape == (1, 3, 224, 224)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    # PIL resize in both; uint8 rounding identical, so only float error remains
    assert torch.allclose(ours, ref, atol=1e-5)


def test_squash_mode_keeps_whole_image():
    pre = Preprocessing(input_size=64, resize_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    out = resize_and_crop(img, pre)
    assert out.size == (64, 64)
    x = preprocess_images([img], pre)
    assert torch.allclose(x[0, 0], torch.ones(64, 64)) and torch.allclose(x[0, 1], -torch.ones(64, 64))


def test_bgr_caffe_normalisation():
    # Caffe style: BGR, pixel - mean with pixels in 0..255
    mean_bgr = (104.0, 117.0, 123.0)
    pre = Preprocessing(input_size=8, resize_mode="squash", channel_order="BGR",
                        mean=tuple(m / 255 for m in mean_bgr), std=(1 / 255,) * 3)
    arr = np.zeros((1, 8, 8, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 10, 20, 30  # R, G, B
    x = normalize_batch(torch.from_numpy(arr), pre)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([30 - 104.0, 20 - 117.0, 10 - 123.0]), atol=1e-4)


def test_invalid_values_rejected():
    with pytest.raises(ValueError):
        Preprocessing(resize_mode="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Preprocessing(crop_pct=0)
    p = Preprocessing().replace(input_size=128)
    assert p.input_size == 128 and Preprocessing.from_dict(p.to_dict()) == p
