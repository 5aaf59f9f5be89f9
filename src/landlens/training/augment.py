"""Training-time augmentation presets for scene classification, and a preview of them.

Every transform maps an RGB :class:`PIL.Image.Image` of any size to a float32 tensor
``(3, S, S)``, ``S = pre.input_size``, normalised with the backbone's mean, std and channel
order (:class:`~landlens.models.preprocessing.Preprocessing`). They are built from
:mod:`torchvision.transforms.v2` plus a few small module-level transforms, draw their
randomness from torch's global generator (so ``torch.manual_seed`` and the per-worker seeds
of a ``DataLoader`` make them reproducible) and are picklable, so they can be sent to
``DataLoader`` worker processes.

Presets (:data:`AUGMENT_PRESETS`):

``none``
    The evaluation view (:func:`build_eval_transform`): no augmentation.
``crop-flip``
    ``RandomResizedCrop(S, scale=(0.25, 1.0))`` + horizontal flip, as in the ResNet50
    transfer-learning study of scene classification. ImageNet training uses
    ``scale=(0.08, 1.0)``, which suits object photos where a small part still shows the
    object; a remote-sensing scene class is defined by the layout of a large area (a
    "medium residential" or "intersection" scene cut down to 8 % of its area is often just
    roofs or asphalt, i.e. another class), so at least a quarter of the scene is kept.
``colour`` (alias ``color``)
    The evaluation geometry + horizontal flip + ``ColorJitter(brightness=0.3,
    contrast=0.3, saturation=0.3, hue=0.05)``: invariance to sensor, season and haze.
``geometric``
    The Keras ``ImageDataGenerator`` setup of the NASNet scene-classification study:
    ``rotation_range=22`` (degrees), ``width_shift_range=0.2``, ``height_shift_range=0.2``,
    ``horizontal_flip=True``, ``fill_mode='nearest'``, applied to the evaluation view.
    ``'nearest'`` fill replicates the edge pixels into the area uncovered by the rotation
    and shift (``scipy.ndimage`` mode ``'nearest'``), so no black corners appear; it is
    implemented with ``grid_sample(padding_mode='border')``, bilinear like Keras
    (spline order 1).
``dihedral``
    A uniformly random element of the dihedral group D4 (the identity, three rotations
    by multiples of 90 degrees, and those four composed with a horizontal flip), applied
    to the evaluation view. Nadir aerial and satellite scenes have no canonical "up", so
    these eight exact, lossless symmetries are natural label-preserving augmentations.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from landlens.errors import ConfigError
from landlens.models.preprocessing import Preprocessing, normalize_batch, resize_and_crop
from landlens.models.tta import dihedral

AUGMENT_PRESETS: tuple[str, ...] = ("none", "crop-flip", "colour", "geometric", "dihedral")
"""The augmentation presets :func:`build_train_transform` accepts (``color`` = ``colour``)."""

_ALIASES = {"color": "colour", "crop_flip": "crop-flip", "cropflip": "crop-flip"}

CROP_SCALE = (0.25, 1.0)
"""Area range of ``crop-flip``'s RandomResizedCrop (ImageNet uses 0.08; see module docstring)."""

GEOMETRIC_ROTATION_DEG = 22.0
GEOMETRIC_SHIFT = 0.2
COLOUR_JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05}


def canonical_preset(preset: str) -> str:
    """The canonical name of an augmentation preset; :class:`ConfigError` if unknown."""
    key = str(preset).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in AUGMENT_PRESETS:
        raise ConfigError(
            f"unknown augmentation preset {preset!r}; choose one of: {', '.join(AUGMENT_PRESETS)}"
        )
    return key


# ------------------------------------------------------------------ small picklable transforms


class _ToRGB(nn.Module):
    """Convert a PIL image to RGB mode (as ``preprocess_images`` does)."""

    def forward(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


class _ResizeCrop(nn.Module):
    """The evaluation geometry: :func:`~landlens.models.preprocessing.resize_and_crop`."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, img: Image.Image) -> Image.Image:
        return resize_and_crop(img, self.pre)

    def extra_repr(self) -> str:
        p = self.pre
        return f"size={p.input_size}, mode={p.resize_mode}, crop_pct={p.crop_pct}, {p.interpolation}"


class _ToBGR(nn.Module):
    """Reverse the channel axis of a (..., 3, H, W) tensor (for Caffe-style BGR weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-3)


class RandomDihedral(nn.Module):
    """A uniformly random element of the dihedral group D4 on the last two (H, W) axes.

    Element ``k`` in ``0..7``: ``rot90(x, k % 4)`` (counter-clockwise), then a horizontal
    flip when ``k >= 4``. Works on any dtype; lossless.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(8, ()).item())
        return dihedral(x, k)


class RandomAffineNearestFill(nn.Module):
    """Random rotation and shift with edge replication: Keras ``ImageDataGenerator`` with
    ``rotation_range``, ``width_shift_range``, ``height_shift_range`` and ``fill_mode='nearest'``.

    For an output pixel ``p`` (pixel coordinates, centre ``c``) the input is sampled at
    ``c + R(theta) (p - c + t)`` (Keras' ``transform_matrix_offset_center(rotation @ shift)``),
    with ``theta ~ U(-rotation, rotation)`` degrees and ``t = (U(-shift, shift) W,
    U(-shift, shift) H)`` pixels, bilinearly (Keras' spline order 1). Samples outside the image
    take the value of the nearest edge pixel (``grid_sample(padding_mode='border')``), so the
    uncovered area is filled by replication, never with a constant.

    Input: a float tensor ``(C, H, W)`` or ``(B, C, H, W)``; output: the same shape and dtype.
    """

    def __init__(self, rotation_deg: float = GEOMETRIC_ROTATION_DEG, shift: float = GEOMETRIC_SHIFT) -> None:
        super().__init__()
        self.rotation_deg = float(rotation_deg)
        self.shift = float(shift)

    def extra_repr(self) -> str:
        return f"rotation_deg={self.rotation_deg}, shift={self.shift}, fill='nearest'"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"RandomAffineNearestFill expects a float tensor, got {x.dtype}")
        u = torch.rand(3, dtype=torch.float64) * 2.0 - 1.0  # three draws in [-1, 1)
        theta = math.radians(float(u[0]) * self.rotation_deg)
        h, w = x.shape[-2], x.shape[-1]
        tx, ty = float(u[1]) * self.shift * w, float(u[2]) * self.shift * h
        return affine_nearest_fill(x, theta, tx, ty)


def affine_nearest_fill(x: torch.Tensor, theta_rad: float, tx: float, ty: float) -> torch.Tensor:
    """Sample ``x`` (``(C, H, W)`` or ``(B, C, H, W)`` float) at ``c + R(theta)(p - c + t)``
    for every output pixel ``p``, replicating edge pixels outside the image (Keras
    ``fill_mode='nearest'``); ``t = (tx, ty)`` in pixels."""
    squeeze = x.ndim == 3
    xb = x.unsqueeze(0) if squeeze else x
    h, w = xb.shape[-2], xb.shape[-1]
    cos, sin = math.cos(theta_rad), math.sin(theta_rad)
    # normalised coordinates (align_corners=False): pixel offset from the centre = n * (W/2, H/2)
    # input_n = D^-1 R D p_n + D^-1 R t, with D = diag(W/2, H/2)
    sx, sy = w / 2.0, h / 2.0
    a = [[cos, -sin * sy / sx], [sin * sx / sy, cos]]
    b = [(cos * tx - sin * ty) / sx, (sin * tx + cos * ty) / sy]
    mat = torch.tensor([[a[0][0], a[0][1], b[0]], [a[1][0], a[1][1], b[1]]], dtype=xb.dtype)
    mat = mat.unsqueeze(0).expand(xb.shape[0], 2, 3)
    grid = F.affine_grid(mat, list(xb.shape), align_corners=False)
    out = F.grid_sample(xb, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(0) if squeeze else out


# ------------------------------------------------------------------ builders


def _interpolation(pre: Preprocessing) -> InterpolationMode:
    return InterpolationMode(pre.interpolation)


def _to_normalised(pre: Preprocessing) -> list[Callable]:
    """uint8 (3, H, W) -> float32 in [0, 1] -> channel order -> (x - mean) / std."""
    steps: list[Callable] = [v2.ToDtype(torch.float32, scale=True)]
    if pre.channel_order == "BGR":
        steps.append(_ToBGR())
    steps.append(v2.Normalize(mean=list(pre.mean), std=list(pre.std)))
    return steps


class _NormaliseAsExtraction(nn.Module):
    """uint8 ``(3, H, W)`` -> the float32 tensor :func:`normalize_batch` makes of it (bit for bit)."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_batch(x.permute(1, 2, 0)[None], self.pre)[0].contiguous()


def build_eval_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform: ``resize_and_crop(img, pre)``, then to a normalised float32
    ``(3, S, S)`` tensor, bit for bit ``landlens.models.preprocessing.preprocess_images([img], pre)[0]``
    (the features of extraction and the search service)."""
    return v2.Compose([_ToRGB(), _ResizeCrop(pre), v2.PILToTensor(), _NormaliseAsExtraction(pre)])


def build_train_transform(preset: str, pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform of an augmentation ``preset`` (see the module docstring).

    Raises:
        ConfigError: ``preset`` is not one of :data:`AUGMENT_PRESETS` (or ``color``).
    """
    name = canonical_preset(preset)
    if name == "none":
        return build_eval_transform(pre)
    s = pre.input_size
    if name == "crop-flip":
        steps: list[Callable] = [
            _ToRGB(),
            v2.RandomResizedCrop(s, scale=CROP_SCALE, interpolation=_interpolation(pre), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            *_to_normalised(pre),
        ]
    elif name == "colour":
        steps = [
            _ToRGB(),
            _ResizeCrop(pre),
            v2.PILToTensor(),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(**COLOUR_JITTER),
            *_to_normalised(pre),
        ]
    elif name == "geometric":
        steps = [
            _ToRGB(),
            _ResizeCrop(pre),
            v2.PILToTensor(),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            RandomAffineNearestFill(GEOMETRIC_ROTATION_DEG, GEOMETRIC_SHIFT),
            *_to_normalised(pre)[1:],  # already float in [0, 1]
        ]
    else:  # dihedral
        steps = [_ToRGB(), _ResizeCrop(pre), v2.PILToTensor(), RandomDihedral(), *_to_normalised(pre)]
    return v2.Compose(steps)


def denormalize_to_uint8(x: torch.Tensor, pre: Preprocessing) -> np.ndarray:
    """A normalised ``(3, H, W)`` tensor back to an ``H x W x 3`` uint8 RGB array for display
    (``x * std + mean``, channel order undone, clipped to [0, 1], rounded)."""
    if x.ndim != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    y = x * std + mean
    if pre.channel_order == "BGR":
        y = y.flip(0)
    y = (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(y.permute(1, 2, 0).numpy())


def preview_augment(
    images: Sequence[Image.Image | str | os.PathLike[str]],
    preset: str,
    pre: Preprocessing,
    out_png: str | os.PathLike[str],
    *,
    n_per_image: int = 6,
    seed: int = 0,
    titles: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid showing what an augmentation preset does.

    One row per image: the evaluation view first, then ``n_per_image`` augmented samples,
    de-normalised for display. Each cell is ``S x S`` pixels (``S = pre.input_size``); the
    layout is that of :func:`landlens.reports.figures.save_image_grid` with
    ``ncols = n_per_image + 1``. With ``titles`` (one per image), the first cell of each row is
    captioned with its title and the others with the preset name and sample number.

    The samples are drawn from a private torch generator state seeded with ``seed`` (the
    global generator is restored afterwards), so the same arguments give identical pixels.

    Raises:
        ConfigError: unknown ``preset``.
        ImageReadError: an image path cannot be decoded.
    """
    from landlens.data.io import load_rgb
    from landlens.reports.figures import save_image_grid

    name = canonical_preset(preset)
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be >= 1, got {n_per_image}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    if not images:
        raise ValueError("no images to preview")
    eval_t = build_eval_transform(pre)
    train_t = build_train_transform(name, pre)
    cells: list[np.ndarray] = []
    captions: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for row, item in enumerate(images):
            img = item if isinstance(item, Image.Image) else load_rgb(item)
            cells.append(denormalize_to_uint8(eval_t(img), pre))
            cells.extend(denormalize_to_uint8(train_t(img), pre) for _ in range(n_per_image))
            if titles is not None:
                captions.append(str(titles[row]))
                captions.extend(f"{name} #{j + 1}" for j in range(n_per_image))
    return save_image_grid(cells, out_png, ncols=n_per_image + 1, titles=captions if titles is not None else None)


__all__ = [
    "AUGMENT_PRESETS",
    "COLOUR_JITTER",
    "CROP_SCALE",
    "GEOMETRIC_ROTATION_DEG",
    "GEOMETRIC_SHIFT",
    "RandomAffineNearestFill",
    "RandomDihedral",
    "affine_nearest_fill",
    "build_eval_transform",
    "build_train_transform",
    "canonical_preset",
    "denormalize_to_uint8",
    "dihedral",
    "preview_augment",
]
