"""A scene classifier: a backbone's pooled features followed by a head that outputs log-probabilities.

The trained model is saved as two files in a run directory, with no pickle anywhere:

- ``model.safetensors``: every tensor of the classifier (backbone and head);
- ``model.json``: what is needed to rebuild the network and read its output: landlens and
  file-format versions, backbone name, head settings, class names, preprocessing, and where the
  backbone's starting weights came from.

:func:`load_classifier` rebuilds the network from ``model.json`` (backbone with random
initialisation, then the head) and loads the tensors strictly, so a file from another backbone,
another head or another number of classes is refused with one line naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landlens.errors import CheckpointError, LandlensError, first_line
from landlens.models.preprocessing import Preprocessing
from landlens.models.registry import Backbone, WeightsInfo

MODEL_FORMAT = "landlens-classifier"
MODEL_FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"


@dataclass(frozen=True)
class HeadConfig:
    """Settings of a classification head (see :func:`landlens.models.heads.build_head`).

    Attributes:
        kind: ``'linear'``, ``'mlp'`` or ``'se'`` (squeeze-and-excitation attention head).
        dropout: dropout probability before the last linear layer.
        hidden: width of the MLP's hidden layer.
        reduction: squeeze-and-excitation reduction ratio.
    """

    kind: str = "linear"
    dropout: float = 0.0
    hidden: int = 512
    reduction: int = 16

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dropout": float(self.dropout), "hidden": int(self.hidden),
                "reduction": int(self.reduction)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadConfig":
        return cls(**{k: d[k] for k in ("kind", "dropout", "hidden", "reduction") if k in d})


class Classifier(nn.Module):
    """Backbone + head; ``forward`` maps normalised images (B, 3, H, W) to log-probabilities (B, C).

    Attributes:
        backbone: the feature extractor (:class:`~landlens.models.registry.Backbone`).
        head: the classification head (ends with log-softmax).
        classes: class names, in output order.
        head_config: how the head was built.
    """

    def __init__(self, backbone: Backbone, classes: list[str], head: HeadConfig | None = None) -> None:
        super().__init__()
        from landlens.models.heads import build_head

        if len(classes) < 2:
            raise LandlensError(f"a classifier needs at least 2 classes, got {len(classes)}")
        self.backbone = backbone
        self.classes = list(classes)
        self.head_config = head or HeadConfig()
        self.head = build_head(backbone.num_features, len(self.classes), **self.head_config.to_dict())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def describe(self) -> dict[str, Any]:
        """Everything :func:`load_classifier` needs besides the tensors."""
        from landlens import __version__

        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "landlens_version": __version__,
            "backbone": self.backbone.spec.name,
            "num_features": self.backbone.num_features,
            "head": self.head_config.to_dict(),
            "classes": list(self.classes),
            "preprocessing": self.backbone.preprocessing.to_dict(),
            "initial_weights": self.backbone.weights.to_dict(),
        }


def save_classifier(model: Classifier, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (atomically, each file).

    Returns the path of ``model.json``.
    """
    from landlens.models.tensorfile import save_module_tensors

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_module_tensors(model, d / MODEL_WEIGHTS)
    meta = model.describe()
    if extra:
        meta["extra"] = extra
    tmp_meta = d / (MODEL_META + ".part")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, d / MODEL_META)
    return d / MODEL_META


def read_model_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``model.json`` of a run directory (or the file itself)."""
    p = Path(directory)
    meta_path = p if p.suffix == ".json" else p / MODEL_META
    if not meta_path.is_file():
        raise CheckpointError(f"no trained model at {p}: {meta_path.name} not found "
                              "(train with 'landlens train run' first)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {meta_path}: {first_line(exc)}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path} is not a landlens classifier file")
    version = meta.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has model-file format {version!r} (written by landlens "
            f"{meta.get('landlens_version', '?')}); this landlens reads format {MODEL_FORMAT_VERSION}")
    for key in ("backbone", "head", "classes", "preprocessing"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks {key!r}")
    return meta


def build_classifier(backbone_name: str, classes: list[str], head: HeadConfig | None = None, *,
                     weights: str = "auto", preprocessing: Preprocessing | None = None,
                     verify: bool = True) -> Classifier:
    """A classifier whose backbone starts from ``weights`` (see ``create_backbone``)."""
    from landlens.models.registry import create_backbone

    backbone = create_backbone(backbone_name, weights, preprocessing=preprocessing, verify=verify)
    return Classifier(backbone, classes, head)


def load_classifier(directory: str | os.PathLike[str], *, map_location: str = "cpu") -> Classifier:
    """Rebuild a trained classifier from ``model.json`` + ``model.safetensors`` (no pickle).

    Raises:
        CheckpointError: missing or unreadable files, another format version, or tensors that do
            not fit the network described (another backbone, head or class count).
    """
    from landlens.models.registry import build_body, get_spec
    from landlens.models.tensorfile import load_module_tensors

    p = Path(directory)
    d = p.parent if p.suffix == ".json" else p
    meta = read_model_meta(p)
    try:
        spec = get_spec(str(meta["backbone"]))
    except LandlensError as exc:
        raise CheckpointError(f"{d / MODEL_META}: {exc}") from None
    body, dim = build_body(spec)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    init = meta.get("initial_weights") or {}
    info = WeightsInfo(source=str(init.get("source", "none")), ref=str(init.get("ref", "")),
                       digest=init.get("digest"), file_sha256=init.get("file_sha256"))
    backbone = Backbone(spec, body, dim, pre, info)
    model = Classifier(backbone, [str(c) for c in meta["classes"]], HeadConfig.from_dict(meta["head"]))
    load_module_tensors(model, d / MODEL_WEIGHTS, what="trained", map_location=map_location,
                        described=f"backbone {spec.name!r} with a {meta['head'].get('kind')} head "
                                  f"and {len(meta['classes'])} classes")
    model.eval()
    return model


__all__ = [
    "Classifier",
    "HeadConfig",
    "MODEL_FORMAT_VERSION",
    "build_classifier",
    "load_classifier",
    "read_model_meta",
    "save_classifier",
]
