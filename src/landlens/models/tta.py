"""Test-time augmentation of a backbone: its features averaged over a group of lossless
transforms of the input (``d4:NAME``, ``c4:NAME``, ``flip:NAME`` in
:func:`~landlens.models.registry.create_backbone`).

Overhead images have no up: a scene rotated by 90 degrees or mirrored is the same scene, yet a
CNN trained on ground-level photographs gives it other features. Averaging the features over the
dihedral group D4 (the identity, three rotations by 90 degrees, and the mirror of each) makes
them invariant to those eight transforms, at eight forward passes per image:

=========  =====================================  ==================
prefix     transforms (elements of D4)            forward passes
=========  =====================================  ==================
``flip``   identity, horizontal mirror            2
``c4``     rotations by 0, 90, 180, 270 degrees   4
``d4``     all eight                              8
=========  =====================================  ==================

The wrapped backbone keeps the inner one's preprocessing and weights; its name (``d4:fusion``)
is what feature stores and archives record, so its features never mix with the inner one's and
a query is embedded the same way. ``benchmarks/results/tta_retrieval.md`` measures what it buys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from landlens.errors import BackboneError
from landlens.models.base import Backbone, BackboneSpec

GROUPS: dict[str, tuple[int, ...]] = {"flip": (0, 4), "c4": (0, 1, 2, 3), "d4": tuple(range(8))}
"""Each test-time group as elements ``k`` of :func:`dihedral`."""


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of D4 applied to the (H, W) axes: ``rot90`` by ``k % 4``, then a
    horizontal flip if ``k >= 4``; the result is contiguous."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral element must be in 0..7, got {k}")
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    if k >= 4:
        y = y.flip(-1)
    return y.contiguous()


class _GroupMean(nn.Module):
    def __init__(self, inner: Backbone, elements: tuple[int, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.elements = elements

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.inner(dihedral(x, k)) for k in self.elements]).mean(0)


class TTABackbone(Backbone):
    """``inner``'s features averaged over the transforms of ``group`` (module docstring)."""

    def __init__(self, group: str, inner: Backbone) -> None:
        if group not in GROUPS:
            raise BackboneError(f"unknown test-time group {group!r}: use one of {', '.join(GROUPS)}")
        spec = BackboneSpec(name=f"{group}:{inner.name}", family="tta", arch=inner.spec.arch,
                            title=f"{inner.spec.title} ({group} test-time mean)",
                            note=f"features averaged over {len(GROUPS[group])} transforms of the input")
        super().__init__(spec, _GroupMean(inner, GROUPS[group]), inner.num_features, inner.preprocessing,
                         inner.weights)
        self.group = group

    @property
    def inner(self) -> Backbone:
        return self.body.inner

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "backbone": self.name, "family": "tta", "tta": self.group,
                "inner": self.inner.name}


__all__ = ["GROUPS", "TTABackbone", "dihedral"]
