"""What a backbone is: a network from images to one feature vector each, its preprocessing and
the identity of its weights (:class:`Backbone`, :class:`BackboneSpec`, :class:`WeightsInfo`);
and what a text tower is: sentences to unit vectors (:class:`TextEncoder`, :class:`TextTowerInfo`).

The bottom of :mod:`landlens.models`: it imports no other landlens module but the
preprocessing, so every backbone family (:mod:`~landlens.models.specs` for timm, torchvision
and GeoEmbed, :mod:`landlens.models.handcrafted`, trained runs in
:mod:`~landlens.models.classifier`) builds on it, and :mod:`~landlens.models.registry` puts
them behind one door.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from landlens.models.preprocessing import Preprocessing

# Prefixes of classifier layers that a feature extractor does not have; checkpoint keys under
# them are dropped before the strict load (and only those).
HEAD_PREFIXES = ("classifier.", "fc.", "head.fc.", "last_linear.", "aux1.", "aux2.", "AuxLogits.")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone architecture (without weights).

    Attributes:
        name: landlens name (what users type).
        family: ``'timm'``, ``'torchvision'``, ``'landlens'`` or ``'handcrafted'``.
        arch: architecture name inside that family.
        title: the name used in papers (e.g. ``'ResNet-50-D'``).
        hub_tag: default pretrained tag on the hub (timm ``arch.tag`` or a torchvision weights
            enum member name such as ``'IMAGENET1K_V1'``); ``None`` when no hub weights exist.
        preprocessing: fixed preprocessing for families without a timm config.
        aliases: other names that resolve to this spec.
        note: one line shown in ``landlens models list``.
    """

    name: str
    family: str
    arch: str
    title: str
    hub_tag: str | None = None
    preprocessing: Preprocessing | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""


class Backbone(nn.Module):
    """A feature extractor: normalised images (B, 3, H, W) -> pooled features (B, num_features).

    Attributes:
        name: registry name of the architecture.
        num_features: length of the feature vector.
        preprocessing: what the loaded weights expect.
        weights: where the weights came from and their digest (:class:`WeightsInfo`).
    """

    def __init__(self, spec: BackboneSpec, body: nn.Module, num_features: int,
                 preprocessing: Preprocessing, weights: "WeightsInfo") -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.num_features = int(num_features)
        self.preprocessing = preprocessing
        self.weights = weights

    @property
    def name(self) -> str:
        return self.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out.flatten(1)

    def describe(self) -> dict[str, Any]:
        """What identifies this feature extractor (recorded in every feature store)."""
        return {
            "backbone": self.spec.name,
            "family": self.spec.family,
            "arch": self.spec.arch,
            "num_features": self.num_features,
            "weights": self.weights.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
        }


@dataclass(frozen=True)
class WeightsInfo:
    """Identity of loaded weights: source kind, reference, and a digest of the tensors."""

    source: str  # 'hub' | 'file' | 'package' | 'none' | 'builtin' (hand-crafted descriptors) | 'run'
    ref: str  # hub tag, file path, 'distribution==version', 'NAME-vN' (builtin), or the run directory
    # sha256 over the loaded state dict, a descriptor's settings, or a run's model.safetensors (None for random init)
    digest: str | None = None
    file_sha256: str | None = None

    def identity(self) -> str:
        return f"{self.source}:{self.ref}:{self.digest}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- text towers


@dataclass(frozen=True)
class TextTowerInfo:
    """Identity of a text tower: name, where its weights came from, their digest, the vector length."""

    name: str
    source: str  # 'package' | 'file' | 'hub'
    ref: str
    digest: str
    dim: int
    max_length: int
    pooling: str = "mean"  # 'mean' (sentence-transformers) | 'clip-eot' (CLIP: the end-of-text token) ...
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "ref": self.ref, "digest": self.digest, "dim": self.dim,
                "max_length": self.max_length, "pooling": self.pooling, **({"extra": self.extra} if self.extra else {})}


class TextEncoder(ABC):
    """A frozen text encoder: :meth:`encode` maps sentences to L2-normalised float32 vectors.

    Subclasses give :meth:`embed`, the unnormalised vectors of one batch; batching, the
    normalisation and the empty case are shared here, so every tower answers alike.
    """

    info: TextTowerInfo

    @property
    def dim(self) -> int:
        return self.info.dim

    @abstractmethod
    def embed(self, sentences: list[str]) -> torch.Tensor:
        """``(len(sentences), dim)`` vectors of one batch, before normalisation."""

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(n, dim)`` float32 vectors of ``sentences``, each of unit length."""
        if isinstance(sentences, str):
            raise TypeError("encode() takes a list of sentences, not one string")
        out = []
        for s in range(0, len(sentences), batch_size):
            vectors = self.embed(list(sentences[s:s + batch_size]))
            out.append(torch.nn.functional.normalize(vectors.float(), p=2, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, {self.info.source}: {self.info.ref}, {self.dim}-d)"


# --------------------------------------------------------------------------- bodies


class Pooled(nn.Module):
    """``features`` followed by global average pooling (SqueezeNet-style bodies)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class AlexNetFc7(nn.Module):
    """AlexNet up to fc7 (4096-d after ReLU), the layer retrieval studies use."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = nn.Sequential(*list(net.classifier.children())[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


__all__ = ["HEAD_PREFIXES", "AlexNetFc7", "Backbone", "BackboneSpec", "Pooled", "TextEncoder", "TextTowerInfo",
           "WeightsInfo"]
