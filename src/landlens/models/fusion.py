"""Several backbones as one feature extractor: the fusion recipe as a :class:`Backbone`.

The CNN-fusion retrieval study L2-normalises each backbone's features and concatenates them
(:func:`landlens.fuse` does that on feature sets extracted separately). A
:class:`FusedBackbone` does the same inside one network, so a fusion can be indexed into an
archive, searched with query images, served, trained on and exported exactly as a single
backbone is: one decode, one preprocessing, one forward.

The images reach it once, decoded and resized by a *carrier* preprocessing: the geometry of the
member with the largest input (its input size, crop rule and interpolation), pixel values in
[0, 1] (mean 0, std 1, RGB). Inside :meth:`FusedBackbone.forward` each member then gets its own
view: resized to its own input size (bilinear, antialiased; nothing when the sizes agree),
channels reordered for BGR (Caffe) weights, normalised with its own mean and std. Each member's
pooled features are L2-normalised and the blocks concatenated, then scaled by 1/sqrt(members)
so the fused vector has unit length (cosine and Euclidean rankings are those of the study's
concatenation).

Names: ``fusion:NAME+NAME+...`` (any backbone names of :func:`create_backbone`), or a preset of
:data:`FUSION_PRESETS` (``fusion`` alone is :data:`DEFAULT_FUSION`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from landlens.errors import BackboneError
from landlens.models.base import Backbone, BackboneSpec, WeightsInfo
from landlens.models.preprocessing import Preprocessing

FUSION_PRESETS: dict[str, tuple[str, ...]] = {
    # the three ImageNet backbones with offline weights: fused retrieval 62.16 mAP (cosine) on
    # UC Merced against 58.96 for EfficientNet-Lite0 alone
    "imagenet3": ("tf_efficientnet_lite0", "tv_mobilenet_v2", "tv_squeezenet1_1"),
    # the same with GeoEmbed v3 (remote-sensing weights, 128 px): as one extractor 66.87 mAP cosine and
    # 84.50 with k-reciprocal re-ranking (extracted separately and fused: 81.90; the ImageNet three:
    # 76.77), 97.80 % 5-fold CV accuracy of logistic regression on the UC Merced train part (97.38)
    "offline4": ("tf_efficientnet_lite0", "tv_mobilenet_v2", "tv_squeezenet1_1", "geoembed_v3"),
    # every offline backbone: 66.13 mAP (83.90 re-ranked), with the two largest EfficientNets added
    "offline6": ("tf_efficientnet_lite0", "tv_mobilenet_v2", "tv_squeezenet1_1", "tf_efficientnet_lite1",
                 "tf_efficientnet_lite2", "geoembed_v3"),
}
DEFAULT_FUSION = "offline4"
"""The preset ``fusion`` names: the best measured fusion without the two largest EfficientNets
(chosen on UC Merced val queries and train-part cross-validation; its extraction takes about
4.7x that of Lite0 alone; benchmarks/results/default_pipeline.md)."""


def fusion_members(name: str) -> tuple[str, ...]:
    """The member backbone names of a fusion name (``fusion``, ``fusion:PRESET`` or
    ``fusion:A+B+...``)."""
    body = name.strip().partition(":")[2].strip()
    if not body:
        body = DEFAULT_FUSION
    if body.lower() in FUSION_PRESETS:
        return FUSION_PRESETS[body.lower()]
    members = tuple(m.strip() for m in body.split("+"))
    if len(members) < 2 or not all(members):
        raise BackboneError(f"backbone {name!r}: a fusion names two or more backbones joined by '+' "
                            f"(fusion:tf_efficientnet_lite0+tv_squeezenet1_1) or a preset "
                            f"({', '.join('fusion:' + p for p in FUSION_PRESETS)})")
    if len(set(members)) != len(members):
        raise BackboneError(f"backbone {name!r}: a member is named twice")
    if any(m.lower().startswith("fusion") for m in members):
        raise BackboneError(f"backbone {name!r}: a fusion cannot hold another fusion")
    return members


def carrier_preprocessing(members: Sequence[Backbone]) -> Preprocessing:
    """The one preprocessing of a fusion: the largest member's geometry, values in [0, 1], RGB."""
    big = max(members, key=lambda b: b.preprocessing.input_size).preprocessing
    return big.replace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order="RGB")


class _MemberView(nn.Module):
    """One member's input from the carrier batch: resize, channel order, normalisation."""

    def __init__(self, pre: Preprocessing, size: int) -> None:
        super().__init__()
        self.size = int(size)
        self.bgr = pre.channel_order == "BGR"
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.bgr:
            x = x.flip(1)
        return (x - self.mean) / self.std


class _FusedBody(nn.Module):
    def __init__(self, members: Sequence[Backbone], sizes: Sequence[int]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.views = nn.ModuleList(_MemberView(m.preprocessing, s) for m, s in zip(members, sizes))
        self.scale = 1.0 / math.sqrt(len(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [F.normalize(m(v(x)).flatten(1).float(), p=2, dim=1, eps=1e-12)
                  for m, v in zip(self.members, self.views)]
        return torch.cat(blocks, dim=1) * self.scale


class FusedBackbone(Backbone):
    """Member backbones run on one carrier batch; their L2-normalised features concatenated.

    Attributes (besides :class:`Backbone`'s): ``members`` (the member backbones, in order) and
    ``member_sizes`` (each member's input side inside the fusion).
    """

    def __init__(self, name: str, members: Sequence[Backbone], weights_arg: str,
                 preprocessing: Preprocessing | None = None) -> None:
        default = carrier_preprocessing(members)
        pre = default if preprocessing is None else preprocessing
        # an override of the carrier size (--input-size) scales every member alike
        sizes = [max(16, round(m.preprocessing.input_size * pre.input_size / default.input_size)) for m in members]
        digests = [m.weights.digest for m in members]
        digest = None if any(d is None for d in digests) else hashlib.sha256(
            "\n".join(f"{m.name}:{d}" for m, d in zip(members, digests)).encode()).hexdigest()
        spec = BackboneSpec(name=name, family="fusion", arch="+".join(m.name for m in members),
                            title=" + ".join(m.spec.title for m in members),
                            note="L2-normalised member features, concatenated")
        super().__init__(spec, _FusedBody(members, sizes), sum(m.num_features for m in members), pre,
                         WeightsInfo(source="fusion", ref=weights_arg, digest=digest))
        self.member_sizes = tuple(sizes)

    @property
    def members(self) -> tuple[Backbone, ...]:
        return tuple(self.body.members)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["members"] = [{**m.describe(), "input_size_in_fusion": s} for m, s in zip(self.members, self.member_sizes)]
        return out


def check_fusion_weights(name: str, weights: str) -> str:
    """The weights argument every member of fusion ``name`` gets, lower-cased; a checkpoint file
    (which holds one backbone) is refused."""
    w = str(weights).strip().lower()
    if w not in ("auto", "package", "hub", "none"):
        raise BackboneError(f"backbone {name!r}: weights {weights!r}: a fusion takes auto, package, hub or none "
                            f"(each member loads its own); a checkpoint file holds one backbone")
    return w


__all__ = ["DEFAULT_FUSION", "FUSION_PRESETS", "FusedBackbone", "carrier_preprocessing", "check_fusion_weights",
           "fusion_members"]
