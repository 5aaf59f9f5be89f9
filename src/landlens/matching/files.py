"""Autoencoder files and the features made of them: what a discriminator compares.

An autoencoder run directory holds ``autoencoder.safetensors`` (the weights, no pickle) and
``autoencoder.json`` (:data:`AE_FORMAT`: architecture, preprocessing, weights digest). Its
encoder is a :class:`~landlens.models.registry.Backbone` (:func:`autoencoder_backbone`) whose
features, extracted once into the feature cache (:func:`encode_dataset`), are the flattened
``n x 8 x 8`` latent maps; :func:`feature_shape` and :func:`feature_identity` say what a
feature set is, so that a discriminator refuses features other than those it was trained on.
The discriminator's own files are :mod:`landlens.matching.scoring`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landlens.errors import CheckpointError, LandlensError, first_line
from landlens.atomic import atomic_write_json
from landlens.features.store import FeatureSet, features_identity
from landlens.matching.networks import LATENT_SIZE, AEConfig, ResidualAutoencoder
from landlens.models.preprocessing import Preprocessing
from landlens.models.registry import Backbone, BackboneSpec, WeightsInfo

AE_FORMAT = "landlens-matching-autoencoder"
AE_FORMAT_VERSION = 1
AE_WEIGHTS = "autoencoder.safetensors"
AE_META = "autoencoder.json"
#: Backbone family of wrapped encoders: a feature store with this family holds latent maps.
AE_FAMILY = "landlens-matching"
IMAGES_FILE = "images.json"
SPLIT_FILE = "split.json"


def ae_preprocessing(input_size: int, resize_mode: str = "squash") -> Preprocessing:
    """What the autoencoder sees: the image resized to ``input_size`` squared, pixels scaled to [0, 1].

    (Mean 0 and standard deviation 1 on [0, 1] pixels: the sigmoid decoder reconstructs exactly
    this.) ``resize_mode='crop'`` keeps the aspect ratio and cuts the centre square.
    """
    return Preprocessing(input_size=int(input_size), crop_pct=1.0, resize_mode=resize_mode,  # type: ignore[arg-type]
                         interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _state_digest(model: nn.Module) -> str:
    from landlens.models.weights import state_dict_digest

    return state_dict_digest({k: v.detach().cpu() for k, v in model.state_dict().items()})


def save_autoencoder(model: ResidualAutoencoder, directory: str | os.PathLike[str],
                     preprocessing: Preprocessing | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``autoencoder.safetensors`` and ``autoencoder.json`` into ``directory`` (no pickle).

    The JSON holds the :class:`AEConfig`, the preprocessing, the sha256 digest of the weights
    (``weights_digest``: the identity of features computed with them) and ``extra``. Returns
    the JSON path.
    """
    from landlens import __version__
    from landlens.models.tensorfile import save_module_tensors

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_module_tensors(model, d / AE_WEIGHTS)
    pre = preprocessing or ae_preprocessing(model.config.input_size)
    meta = {"format": AE_FORMAT, "format_version": AE_FORMAT_VERSION, "landlens_version": __version__,
            "config": model.config.to_dict(), "preprocessing": pre.to_dict(),
            "latent_shape": list(model.config.latent_shape), "weights_digest": _state_digest(model),
            "extra": extra or {}}
    atomic_write_json(d / AE_META, meta)
    return d / AE_META


def _ae_meta_path(directory: str | os.PathLike[str]) -> Path:
    p = Path(directory)
    return p if p.suffix == ".json" else p / AE_META


def read_autoencoder_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``autoencoder.json`` of a run directory (or the file itself).

    Raises:
        CheckpointError: missing or unreadable file, another format or version, or an invalid config.
    """
    path = _ae_meta_path(directory)
    if not path.is_file():
        raise CheckpointError(f"no autoencoder at {Path(directory)}: {AE_META} not found")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    if not isinstance(meta, dict) or meta.get("format") != AE_FORMAT:
        raise CheckpointError(f"{path} is not a landlens matching-autoencoder file")
    if meta.get("format_version") != AE_FORMAT_VERSION:
        raise CheckpointError(f"{path} has autoencoder-file format {meta.get('format_version')!r}; "
                              f"this landlens reads format {AE_FORMAT_VERSION}")
    try:
        AEConfig.from_dict(meta["config"])
        Preprocessing.from_dict(meta["preprocessing"])
    except (LandlensError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid autoencoder description: {first_line(exc)}") from None
    return meta


def load_autoencoder(directory: str | os.PathLike[str], *, map_location: str = "cpu") -> ResidualAutoencoder:
    """Rebuild an autoencoder saved by :func:`save_autoencoder` (eval mode, no pickle).

    Raises:
        CheckpointError: see :func:`read_autoencoder_meta`; missing, unreadable or mismatching tensors.
    """
    from landlens.models.tensorfile import load_module_tensors

    meta_path = _ae_meta_path(directory)
    meta = read_autoencoder_meta(directory)
    model = ResidualAutoencoder(AEConfig.from_dict(meta["config"]))
    load_module_tensors(model, meta_path.parent / AE_WEIGHTS, what="autoencoder", map_location=map_location,
                        described=f"the autoencoder described in {meta_path.name} ({meta['config']})")
    model.to(map_location).eval()
    return model


# ============================================================================ encoder as a backbone

class _LatentRows(nn.Module):
    """The encoder of an autoencoder: images ``(B, 3, S, S)`` -> flattened latent maps ``(B, n * 64)``."""

    def __init__(self, ae: ResidualAutoencoder) -> None:
        super().__init__()
        self.stem = ae.stem
        self.down = ae.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.stem(x)).flatten(1)


def autoencoder_backbone(ae_run: str | os.PathLike[str]) -> Backbone:
    """The encoder of a saved autoencoder as a :class:`Backbone` whose features are flattened latent maps.

    Its family is :data:`AE_FAMILY` and its weights digest is the autoencoder's
    ``weights_digest``, so :func:`~landlens.features.cache.cached_features` keeps one store per
    autoencoder and refuses to mix features of different ones.
    """
    from landlens.hashing import cached_file_digest

    meta = read_autoencoder_meta(ae_run)
    ae = load_autoencoder(ae_run)
    cfg = ae.config
    c, h, w = cfg.latent_shape
    spec = BackboneSpec(name=f"{cfg.kind}-ae", family=AE_FAMILY,
                        arch=f"{cfg.kind}-ae-{cfg.input_size}-w{'-'.join(map(str, cfg.widths))}-z{c}x{h}x{w}",
                        title="ResDyadAE latent maps" if cfg.kind == "resdyad" else "ResAE latent maps")
    wpath = _ae_meta_path(ae_run).parent / AE_WEIGHTS
    weights = WeightsInfo(source="file", ref=str(wpath.resolve()), digest=str(meta["weights_digest"]),
                          file_sha256=cached_file_digest(wpath))
    return Backbone(spec, _LatentRows(ae).eval(), c * h * w, Preprocessing.from_dict(meta["preprocessing"]), weights)


def encode_dataset(ae_run: str | os.PathLike[str], data: str | os.PathLike[str], dataset: str | None = None, *,
                   cache_dir: str | os.PathLike[str] = "runs/features", workers: int | None = None,
                   progress: bool = True, command: str | None = None) -> FeatureSet:
    """Latent maps of every readable image under ``data`` as rows of ``n * 64`` values (not normalised).

    Extracted once into ``cache_dir`` (a :class:`~landlens.features.store.FeatureStore` keyed by
    the autoencoder's weights digest) and reused afterwards; an interrupted extraction resumes.
    Rows of unreadable images are dropped.
    """
    from landlens.features.cache import cached_features

    return cached_features(data, dataset, autoencoder_backbone(ae_run), cache_dir=cache_dir, workers=workers,
                           progress=progress, command=command)


def feature_shape(features: FeatureSet) -> tuple[int, int, int]:
    """``(C, H, W)`` of each row: ``(n, 8, 8)`` for autoencoder latents, ``(D, 1, 1)`` for vectors."""
    x = features.features
    if getattr(x, "ndim", 0) != 2:
        raise LandlensError(f"features must be a 2-D (images, values) array, got shape {getattr(x, 'shape', None)}")
    d = int(x.shape[1])
    arch = str(((features.meta or {}).get("identity") or {}).get("arch") or "")
    side = LATENT_SIZE
    if arch.startswith(AE_FAMILY + "/") and d % (side * side) == 0:
        return (d // (side * side), side, side)
    return (d, 1, 1)


def feature_identity(features: FeatureSet) -> dict[str, Any]:
    """What identifies features for a discriminator: extractor, weights digest, preprocessing, size.

    Recorded with a trained discriminator and compared (key by key) with the features it is
    later asked to rank (:func:`~landlens.matching.scoring.check_features`).
    """
    fusion = (features.meta or {}).get("fusion")
    out = features_identity(features.meta, int(features.features.shape[1]))
    if fusion:  # discriminators record the fusion in full, fit rows included, as they always have
        out["fusion"] = fusion
    out["shape"] = list(feature_shape(features))
    return out


def run_kind(run_dir: str | os.PathLike[str]) -> str:
    """``'autoencoder'`` or ``'discriminator'``: what a matching run directory holds (``CheckpointError`` else)."""
    p = Path(run_dir)
    if (p / AE_META).is_file():
        return "autoencoder"
    if (p / "discriminator.json").is_file():
        return "discriminator"
    raise CheckpointError(f"{p} holds no trained autoencoder or discriminator")


__all__ = [
    "AE_FAMILY",
    "AE_FORMAT",
    "AE_META",
    "AE_WEIGHTS",
    "IMAGES_FILE",
    "SPLIT_FILE",
    "ae_preprocessing",
    "autoencoder_backbone",
    "encode_dataset",
    "feature_identity",
    "feature_shape",
    "load_autoencoder",
    "read_autoencoder_meta",
    "run_kind",
    "save_autoencoder",
]
