"""The preprocessing a set of weights expects, and the functions that apply it.

Every backbone carries a :class:`Preprocessing`, so that input size, resize rule, channel
order and normalisation are never guessed (the timm ``pretrained_cfg`` idea). Images travel
between processes as ``uint8`` HWC arrays already resized and cropped; normalisation happens
once per batch on the tensor (:func:`normalize_batch`), which is both cheaper and exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from landlens.data.io import DEFAULT_MAX_PIXELS, load_rgb

ResizeMode = Literal["crop", "squash"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PIL_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone's weights expect as input.

    Attributes:
        input_size: side of the square network input in pixels.
        crop_pct: for ``resize_mode='crop'``, the shorter image side is resized to
            ``round(input_size / crop_pct)`` and the centre ``input_size`` square is cut out
            (the ImageNet evaluation rule). Ignored for ``'squash'``.
        resize_mode: ``'crop'`` (shorter side + centre crop) or ``'squash'`` (the whole image
            resized to ``input_size`` x ``input_size``, aspect ratio not kept).
        interpolation: ``'bilinear'``, ``'bicubic'``, ``'nearest'`` or ``'lanczos'``.
        mean, std: per-channel normalisation on pixel values scaled to [0, 1], in the channel
            order the network sees.
        channel_order: ``'RGB'`` or ``'BGR'`` (Caffe-converted weights).
    """

    input_size: int = 224
    crop_pct: float = 0.875
    resize_mode: ResizeMode = "crop"
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channel_order: Literal["RGB", "BGR"] = "RGB"

    def __post_init__(self) -> None:
        if self.input_size <= 0:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if self.resize_mode not in ("crop", "squash"):
            raise ValueError(f"resize_mode must be 'crop' or 'squash', got {self.resize_mode!r}")
        if self.interpolation not in _PIL_INTERP:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (``'crop'`` mode)."""
        return int(math.floor(self.input_size / self.crop_pct))

    @property
    def draft_side(self) -> int:
        """The smallest side a decoded image may have before :func:`resize_and_crop` (the
        JPEG draft request of :func:`decode_image`): ``input_size`` when squashing, else
        ``resize_size``."""
        return self.input_size if self.resize_mode == "squash" else self.resize_size

    def replace(self, **changes: Any) -> "Preprocessing":
        values = self.to_dict()
        values.update(changes)
        return Preprocessing.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        d = dict(d)
        d["mean"] = tuple(float(v) for v in d.get("mean", IMAGENET_MEAN))
        d["std"] = tuple(float(v) for v in d.get("std", IMAGENET_STD))
        return cls(**d)

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> "Preprocessing":
        """Build from a timm data config (``timm.data.resolve_data_config``)."""
        size = cfg.get("input_size", (3, 224, 224))
        crop_mode = cfg.get("crop_mode", "center")
        return cls(
            input_size=int(size[-1]),
            crop_pct=float(cfg.get("crop_pct", 0.875) or 1.0),
            resize_mode="squash" if crop_mode == "squash" else "crop",
            interpolation=str(cfg.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        )


def decode_image(path: Any, pre: Preprocessing, *, rgb_bands: Sequence[int] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file for a network with preprocessing ``pre``: the one decode path.

    Extraction, archive queries and the service, training, prediction, feature maps and the
    matching autoencoder all decode through here, so the same file gives the same pixels
    everywhere. :func:`landlens.data.io.load_rgb` does the work (bands, bit depth, alpha,
    ``max_pixels`` checked on the header); a JPEG is decoded at the smallest DCT scale whose
    result still has both sides at least :attr:`Preprocessing.draft_side`, which the resize
    that follows would reach anyway.
    """
    side = pre.draft_side
    return load_rgb(path, draft_size=(side, side), rgb_bands=rgb_bands, max_pixels=max_pixels)


def load_resized(path: Any, pre: Preprocessing, *, rgb_bands: Sequence[int] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``(S, S, 3)`` uint8 network input of an image file: :func:`decode_image`, then
    :func:`resize_and_crop` (the form images travel in between processes)."""
    return to_uint8_array(resize_and_crop(decode_image(path, pre, rgb_bands=rgb_bands, max_pixels=max_pixels), pre))


def resize_and_crop(img: Image.Image, pre: Preprocessing) -> Image.Image:
    """Apply the resize rule of ``pre`` to an RGB PIL image (any size, any aspect ratio).

    ``'crop'`` follows torchvision's ``Resize(resize_size)`` + ``CenterCrop(input_size)``
    pixel for pixel; ``'squash'`` resizes the whole image to ``input_size`` squared.
    """
    target = pre.input_size
    resample = _PIL_INTERP[pre.interpolation]
    w, h = img.size
    if pre.resize_mode == "squash":
        if (w, h) != (target, target):
            img = img.resize((target, target), resample)
        return img
    # the same integer arithmetic as torchvision's Resize(int) + CenterCrop, so features match
    # those of the reference pipelines exactly (a one-pixel shift changes CNN features)
    short = pre.resize_size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample, reducing_gap=None)
    left = int(round((nw - target) / 2.0))
    top = int(round((nh - target) / 2.0))
    if (nw, nh) != (target, target):
        img = img.crop((left, top, left + target, top + target))
    return img


def to_uint8_array(img: Image.Image) -> np.ndarray:
    """HWC uint8 array of an RGB image (the form images travel in between processes)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def normalize_batch(batch: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) normalised, in channels-last memory layout.

    A permuted NHWC tensor is already channels-last in memory, so no copy is spent on layout.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4:
        raise ValueError(f"expected a uint8 (B, H, W, C) batch, got {batch.dtype} {tuple(batch.shape)}")
    x = batch.permute(0, 3, 1, 2)
    if pre.channel_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
    # one new float tensor, normalised in place: each fresh batch-sized tensor costs more (page
    # faults) than the arithmetic, so this takes half the time of (x - mean) * inv_std, same values
    x = x.to(torch.float32).sub_(mean).mul_(inv_std)
    return x.contiguous(memory_format=torch.channels_last)


def preprocess_images(images: Sequence[Image.Image], pre: Preprocessing) -> torch.Tensor:
    """Convenience: a list of PIL images -> a normalised float batch (B, C, H, W)."""
    arrays = [to_uint8_array(resize_and_crop(im.convert("RGB"), pre)) for im in images]
    return normalize_batch(torch.from_numpy(np.stack(arrays)), pre)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "decode_image",
    "load_resized",
    "normalize_batch",
    "preprocess_images",
    "resize_and_crop",
    "to_uint8_array",
]
