"""Trained models of a run: a scene classifier, or a metric-learning embedder; both saved without pickle.

A :class:`Classifier` is a backbone's pooled features followed by a head that outputs
log-probabilities; an :class:`Embedder` (metric learning, :mod:`landlens.training.metric`) is a
backbone followed by an :class:`EmbeddingHead` that outputs L2-normalised embeddings.

The trained model is saved as two files in a run directory, with no pickle anywhere:

- ``model.safetensors``: every tensor of the model (backbone and head);
- ``model.json``: what is needed to rebuild the network and read its output: landlens and
  file-format versions, backbone name, head settings, class names (for an embedder: the
  training classes), preprocessing, where the backbone's starting weights came from, and the
  sha256 of ``model.safetensors`` as written.

:func:`load_classifier` rebuilds the network from ``model.json`` (backbone with random
initialisation, then the head) and loads the tensors strictly, so a file from another backbone,
another head or another number of classes is refused with one line naming the file.
:func:`load_embedder` does the same for an embedder, :func:`load_model` for either.

A run directory is also a feature extractor: :func:`run_backbone` (what
``create_backbone("run:PATH")`` calls, so ``--backbone run:PATH`` works wherever a backbone
name does) gives the fine-tuned backbone's pooled features of a classification run (the head
dropped), or the L2-normalised embedding of a metric-learning run, under the run's recorded
preprocessing, with weights identity ``source='run'``, ``ref=`` the resolved run directory and
``digest=`` the sha256 of its ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from landlens.atomic import atomic_write_json
from landlens.errors import BackboneError, CheckpointError, LandlensError, WeightsError, first_line
from landlens.models.preprocessing import Preprocessing
from landlens.models.base import Backbone, BackboneSpec, WeightsInfo
from landlens.models.tta import GROUPS, TTABackbone

MODEL_FORMAT = "landlens-classifier"
EMBEDDER_FORMAT = "landlens-embedder"
MODEL_FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
RUN_PREFIX = "run:"


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


class _BackboneWithHead(nn.Module):
    """What a classifier and an embedder share: a backbone, a head on its pooled features, the
    class names, and the description :func:`save_classifier` writes (``_head_description``
    names the head)."""

    backbone: Backbone
    head: nn.Module
    classes: list[str]
    _format: str

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _head_description(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Everything the loader needs besides the tensors."""
        from landlens import __version__

        return {
            "format": self._format,
            "format_version": MODEL_FORMAT_VERSION,
            "landlens_version": __version__,
            "backbone": self.backbone.spec.name,
            "num_features": self.backbone.num_features,
            **self._head_description(),
            "classes": list(self.classes),
            "preprocessing": self.backbone.preprocessing.to_dict(),
            "initial_weights": self.backbone.weights.to_dict(),
            # a fusion (models.fusion), also inside a test-time mean (models.tta: ``c4:fusion``):
            # each member's architecture and the view it was trained on
            **({"members": [{"backbone": m.spec.name, "preprocessing": m.preprocessing.to_dict(),
                             "initial_weights": m.weights.to_dict()} for m in fused.members]}
               if hasattr(fused := getattr(self.backbone, "inner", self.backbone), "members") else {}),
        }


class Classifier(_BackboneWithHead):
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

    _format = MODEL_FORMAT

    def _head_description(self) -> dict[str, Any]:
        return {"head": self.head_config.to_dict()}


class EmbeddingHead(nn.Module):
    """Linear projection (optionally followed by BatchNorm) to ``dim``, then L2 normalisation.

    The embedding layer of deep metric learning (e.g. Kim et al., "Proxy Anchor Loss for Deep
    Metric Learning", CVPR 2020, Sec. 4.1: a linear layer on the pooled backbone features);
    ``forward`` returns unit-length rows, so cosine similarity is a dot product.
    """

    def __init__(self, in_features: int, dim: int, bn: bool = False) -> None:
        super().__init__()
        if int(dim) < 1:
            raise LandlensError(f"embedding dimension must be >= 1, got {dim}")
        self.fc = nn.Linear(int(in_features), int(dim))
        self.bn = nn.BatchNorm1d(int(dim)) if bn else nn.Identity()
        self.dim = int(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.fc(z)), dim=1)


@dataclass(frozen=True)
class EmbeddingConfig:
    """Settings of an :class:`EmbeddingHead`: output length ``dim`` and a BatchNorm after the projection."""

    dim: int = 128
    bn: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "embedding", "dim": int(self.dim), "bn": bool(self.bn)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbeddingConfig":
        return cls(dim=int(d["dim"]), bn=bool(d.get("bn", False)))


class Embedder(_BackboneWithHead):
    """Backbone + embedding head; ``forward`` maps normalised images (B, 3, H, W) to unit vectors (B, dim).

    Attributes:
        backbone: the feature extractor (:class:`~landlens.models.registry.Backbone`).
        head: the :class:`EmbeddingHead`.
        classes: the classes of the training part (recorded, not predicted).
        embedding: how the head was built.
    """

    def __init__(self, backbone: Backbone, classes: list[str], embedding: EmbeddingConfig | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classes = list(classes)
        self.embedding = embedding or EmbeddingConfig()
        self.head = EmbeddingHead(backbone.num_features, self.embedding.dim, self.embedding.bn)

    @property
    def dim(self) -> int:
        return self.embedding.dim

    _format = EMBEDDER_FORMAT

    def _head_description(self) -> dict[str, Any]:
        return {"embedding": self.embedding.to_dict()}


def save_classifier(model: "Classifier | Embedder", directory: str | os.PathLike[str],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` (atomically, each file).

    Works for a :class:`Classifier` and an :class:`Embedder`; ``model.json`` records the
    sha256 of the tensors file it goes with. Returns the path of ``model.json``.
    """
    from landlens.hashing import file_digest
    from landlens.models.tensorfile import save_module_tensors

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_module_tensors(model, d / MODEL_WEIGHTS)
    meta = model.describe()
    meta["weights_sha256"] = file_digest(d / MODEL_WEIGHTS)
    if extra:
        meta["extra"] = extra
    atomic_write_json(d / MODEL_META, meta, indent=2, sort_keys=False)
    return d / MODEL_META


def read_model_meta(directory: str | os.PathLike[str], *,
                    formats: tuple[str, ...] = (MODEL_FORMAT,)) -> dict[str, Any]:
    """Read and check ``model.json`` of a run directory (or the file itself).

    ``formats``: the model kinds accepted (:data:`MODEL_FORMAT` for a classifier,
    :data:`EMBEDDER_FORMAT` for an embedder).
    """
    p = Path(directory)
    meta_path = p if p.suffix == ".json" else p / MODEL_META
    if not meta_path.is_file():
        raise CheckpointError(f"no trained model at {p}: {meta_path.name} not found "
                              "(train with 'landlens train run' first)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {meta_path}: {first_line(exc)}") from None
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind not in formats:
        if kind == EMBEDDER_FORMAT:
            raise CheckpointError(f"{meta_path} holds a metric-learning embedder, not a classifier (it predicts no "
                                  f"class); use it as a feature extractor: --backbone {RUN_PREFIX}{meta_path.parent}")
        if kind == MODEL_FORMAT:
            raise CheckpointError(f"{meta_path} holds a classifier, not a metric-learning embedder")
        raise CheckpointError(f"{meta_path} is not a landlens classifier file")
    version = meta.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has model-file format {version!r} (written by landlens "
            f"{meta.get('landlens_version', '?')}); this landlens reads format {MODEL_FORMAT_VERSION}")
    needed = ("embedding",) if kind == EMBEDDER_FORMAT else ("head",)
    for key in ("backbone", *needed, "classes", "preprocessing"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks {key!r}")
    return meta


def build_classifier(backbone_name: str, classes: list[str], head: HeadConfig | None = None, *,
                     weights: str = "auto", preprocessing: Preprocessing | None = None,
                     verify: bool = True) -> Classifier:
    """A classifier whose backbone starts from ``weights`` (as
    :func:`~landlens.models.registry.create_backbone` builds it, trained runs included)."""
    from landlens.models.specs import get_spec
    from landlens.models.weights import load_backbone_weights

    if backbone_name.strip().lower().startswith("run:"):
        backbone = run_backbone(backbone_name, weights, preprocessing=preprocessing)
    else:
        backbone = load_backbone_weights(get_spec(backbone_name), weights, preprocessing=preprocessing, verify=verify)
    return Classifier(backbone, classes, head)


def load_classifier(directory: str | os.PathLike[str], *, map_location: str = "cpu") -> Classifier:
    """Rebuild a trained classifier from ``model.json`` + ``model.safetensors`` (no pickle).

    Raises:
        CheckpointError: missing or unreadable files, another format version, or tensors that do
            not fit the network described (another backbone, head or class count).
    """
    from landlens.models.tensorfile import load_module_tensors

    p = Path(directory)
    d = p.parent if p.suffix == ".json" else p
    meta = read_model_meta(p)
    backbone = _rebuild_backbone(meta, d)
    spec = backbone.spec
    model = Classifier(backbone, [str(c) for c in meta["classes"]], HeadConfig.from_dict(meta["head"]))
    load_module_tensors(model, d / MODEL_WEIGHTS, what="trained", map_location=map_location,
                        described=f"backbone {spec.name!r} with a {meta['head'].get('kind')} head "
                                  f"and {len(meta['classes'])} classes")
    model.eval()
    return model


def _rebuild_backbone(meta: dict[str, Any], d: Path) -> Backbone:
    """The backbone ``model.json`` describes, randomly initialised (the tensors come next)."""
    name = str(meta["backbone"])
    group, sep, inner = name.partition(":")
    if sep and group.lower() in GROUPS:  # a test-time mean (``c4:NAME``) around the backbone NAME
        return TTABackbone(group.lower(), _rebuild_backbone({**meta, "backbone": inner}, d))
    if name.lower().startswith("fusion:"):
        from landlens.models.fusion import FusedBackbone

        members = meta.get("members")
        if not isinstance(members, list) or len(members) < 2:
            raise CheckpointError(f"{d / MODEL_META}: a fusion backbone without its 'members'")
        built = [_rebuild_one(m, d) for m in members]
        return FusedBackbone(name, built, str((meta.get("initial_weights") or {}).get("ref", "auto")),
                             _preprocessing(meta, d))
    return _rebuild_one(meta, d)


def _preprocessing(meta: dict[str, Any], d: Path) -> Preprocessing:
    try:
        return Preprocessing.from_dict(meta["preprocessing"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{d / MODEL_META}: unusable preprocessing: {first_line(exc)}") from None


def _rebuild_one(meta: dict[str, Any], d: Path) -> Backbone:
    """One single backbone of ``model.json`` (the model's, or a fusion member's)."""
    from landlens.models.specs import build_body, get_spec

    try:
        spec = get_spec(str(meta["backbone"]))
    except LandlensError as exc:
        raise CheckpointError(f"{d / MODEL_META}: {exc}") from None
    pre = _preprocessing(meta, d)
    init = meta.get("initial_weights") or {}
    info = WeightsInfo(source=str(init.get("source", "none")), ref=str(init.get("ref", "")),
                       digest=init.get("digest"), file_sha256=init.get("file_sha256"))
    if spec.family == "handcrafted":  # its length and input normalisation follow the preprocessing
        from landlens.models.handcrafted import HandcraftedBackbone, build_descriptor

        body, dim = build_descriptor(spec.arch, pre)
        return HandcraftedBackbone(spec, body, dim, pre, info)
    body, dim = build_body(spec)
    return Backbone(spec, body, dim, pre, info)


def load_embedder(directory: str | os.PathLike[str], *, map_location: str = "cpu") -> Embedder:
    """Rebuild a trained metric-learning :class:`Embedder` from ``model.json`` + ``model.safetensors``.

    Raises:
        CheckpointError: missing or unreadable files, not an embedder, or tensors that do not fit.
    """
    from landlens.models.tensorfile import load_module_tensors

    p = Path(directory)
    d = p.parent if p.suffix == ".json" else p
    meta = read_model_meta(p, formats=(EMBEDDER_FORMAT,))
    backbone = _rebuild_backbone(meta, d)
    try:
        emb = EmbeddingConfig.from_dict(meta["embedding"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{d / MODEL_META}: unusable embedding settings: {first_line(exc)}") from None
    model = Embedder(backbone, [str(c) for c in meta["classes"]], emb)
    load_module_tensors(model, d / MODEL_WEIGHTS, what="trained", map_location=map_location,
                        described=f"backbone {backbone.spec.name!r} with a {emb.dim}-d embedding head")
    model.eval()
    return model


def load_model(directory: str | os.PathLike[str], *, map_location: str = "cpu") -> "Classifier | Embedder":
    """The trained model of a run directory, whichever kind it is (classifier or embedder)."""
    meta = read_model_meta(directory, formats=(MODEL_FORMAT, EMBEDDER_FORMAT))
    if meta["format"] == EMBEDDER_FORMAT:
        return load_embedder(directory, map_location=map_location)
    return load_classifier(directory, map_location=map_location)


# --------------------------------------------------------------------------- runs as backbones


class _EmbeddingBody(nn.Module):
    """A trained embedder as a backbone body: pooled features, projection, L2 normalisation."""

    def __init__(self, body: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def is_run_reference(text: str | None) -> bool:
    """``True`` for ``'run:PATH'`` (a trained run used as a backbone)."""
    return isinstance(text, str) and text.strip().lower().startswith(RUN_PREFIX)


def _split_pin(text: str) -> tuple[str, str | None]:
    """``'PATH@DIGEST'`` -> (PATH, digest prefix); a trailing ``@`` + 8 to 64 hex digits pins the digest."""
    head, sep, tail = text.rpartition("@")
    if sep and 8 <= len(tail) <= 64 and all(c in "0123456789abcdefABCDEF" for c in tail):
        return head, tail.lower()
    return text, None


def run_weights_argument(ref: str, digest: str | None = None) -> str:
    """The ``create_backbone`` weights argument that rebuilds a run backbone recorded as
    ``{'source': 'run', 'ref': ref, 'digest': digest}`` and refuses a run whose weights changed."""
    return f"{RUN_PREFIX}{ref}" + (f"@{digest}" if digest else "")


def run_backbone(name: str, weights: str = "auto", *, preprocessing: Preprocessing | None = None) -> Backbone:
    """The feature extractor of a trained run directory (what ``create_backbone('run:PATH')`` returns).

    - classification run: the fine-tuned backbone's pooled features (the head is dropped);
    - metric-learning run: the L2-normalised embedding.

    Args:
        name: ``'run:PATH'`` (PATH: the run directory or its ``model.json``); may end with
            ``@DIGEST`` (8 to 64 hex digits) to require that digest.
        weights: ``'auto'`` (or ``'run'``): the run's own ``model.safetensors``; or
            ``'run:PATH[@DIGEST]'``, which gives the run's location (and pinned digest) and
            overrides the name's (how a search index rebuilds it: the name then only has to
            name a run directory of the same base name).
        preprocessing: overrides the run's recorded preprocessing.

    The backbone's name is ``'run:'`` + the run directory's base name; its weights identity
    is ``WeightsInfo('run', <resolved directory>, <sha256 of model.safetensors>)``.

    Raises:
        BackboneError: no such run directory, or no ``model.json`` in it.
        WeightsError: a ``model.safetensors`` whose sha256 differs from the pinned digest or
            from the one its ``model.json`` recorded, or a weights argument that does not apply.
        CheckpointError: unreadable or mismatched model files.
    """
    from landlens.hashing import cached_file_digest

    if not is_run_reference(name):
        raise BackboneError(f"{name!r} is not a run reference (expected run:PATH)")
    path_text, pin = _split_pin(name.strip()[len(RUN_PREFIX):])
    w = (weights or "auto").strip()
    if is_run_reference(w):
        w_path, w_pin = _split_pin(w[len(RUN_PREFIX):])
        if w_path:
            if path_text and Path(path_text).name != Path(w_path).name:
                raise BackboneError(f"backbone {name!r} and weights {weights!r} name different runs")
            path_text = w_path
        pin = w_pin or pin
    elif w.lower() not in ("auto", "run"):
        raise WeightsError(f"backbone {name!r} is a trained run: its weights are the run's {MODEL_WEIGHTS}; "
                           f"--weights {weights!r} does not apply (use 'auto')")
    if not path_text:
        raise BackboneError(f"backbone {name!r}: give the run directory after 'run:' (run:PATH)")
    d = Path(path_text).expanduser()
    if d.suffix == ".json" and d.name == MODEL_META:
        d = d.parent
    if not d.exists():
        raise BackboneError(f"run directory not found: {d} (backbone {name.strip()!r})")
    if not d.is_dir():
        raise BackboneError(f"backbone {name.strip()!r}: {d} is not a run directory")
    if not (d / MODEL_META).is_file():
        raise BackboneError(f"{d} is not a trained run: {MODEL_META} not found (train with 'landlens train run')")
    d = d.resolve()
    tensors = d / MODEL_WEIGHTS
    if not tensors.is_file():
        raise CheckpointError(f"no trained weights at {tensors}")
    digest = cached_file_digest(tensors)
    meta = read_model_meta(d, formats=(MODEL_FORMAT, EMBEDDER_FORMAT))
    recorded = meta.get("weights_sha256")
    if recorded and recorded != digest:
        raise WeightsError(f"{tensors} has sha256 {digest[:12]}, but {MODEL_META} recorded {str(recorded)[:12]}: "
                           f"the weights file was replaced after training")
    if pin and not digest.startswith(pin):
        raise WeightsError(f"run {d}: {MODEL_WEIGHTS} has digest {digest[:12]}, expected {pin[:12]} "
                           f"(the run was retrained or its weights replaced since they were recorded)")
    model = load_model(d)
    inner = model.backbone
    if isinstance(model, Embedder):
        body: nn.Module = _EmbeddingBody(inner.body, model.head)
        dim, kind = model.dim, f"{model.dim}-d metric-learning embedding"
    else:
        body, dim, kind = inner.body, inner.num_features, f"{inner.num_features}-d fine-tuned features"
    spec = BackboneSpec(f"{RUN_PREFIX}{d.name}", "run", inner.spec.name, f"trained run {d.name} ({inner.spec.title})",
                        note=f"{kind} of {inner.spec.name}, run {d}")
    info = WeightsInfo("run", str(d), digest, digest)
    return Backbone(spec, body.eval(), dim, preprocessing or inner.preprocessing, info).eval()


__all__ = [
    "Classifier",
    "EMBEDDER_FORMAT",
    "EmbeddingConfig",
    "EmbeddingHead",
    "Embedder",
    "HeadConfig",
    "MODEL_FORMAT_VERSION",
    "RUN_PREFIX",
    "build_classifier",
    "is_run_reference",
    "load_classifier",
    "load_embedder",
    "load_model",
    "read_model_meta",
    "run_backbone",
    "run_weights_argument",
    "save_classifier",
]
