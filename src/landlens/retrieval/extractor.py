"""The feature extractor an index records: rebuilt, checked, and used to embed queries.

An index built from a feature store (:func:`~landlens.retrieval.index.build_index_from_store`)
records the store's identity: backbone, weights source and digest, preprocessing and RGB bands.
:func:`backbone_for_index` rebuilds that backbone from the recorded weights (refusing one whose
digest differs), :func:`decode_queries` decodes query files by the one decode path
(:func:`~landlens.models.preprocessing.decode_image`) with the recorded bands, and
:func:`embed_images` runs the backbone on decoded images, so a query is embedded exactly as the
indexed images were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from landlens.errors import LandlensError, first_line
from landlens.retrieval.index import SearchIndex, SearchIndexError


def recorded_identity(index: SearchIndex) -> dict[str, Any]:
    ident = index.meta.get("identity")
    if not ident or "weights_digest" not in ident:
        raise SearchIndexError(
            "this index records no feature extractor (it was not built from a feature store); "
            "search it with vectors, not images"
        )
    return ident


def weights_argument(recorded: dict[str, Any]) -> str:
    """The ``create_backbone`` weights argument that reloads recorded weights."""
    source, ref = recorded.get("source"), str(recorded.get("ref") or "")
    if source == "package":
        return "package"
    if source == "builtin":  # hand-crafted descriptors: nothing to load
        return "auto"
    if source == "fusion":  # several backbones: the argument each member was loaded with
        return ref or "auto"
    if source == "run":  # a trained run directory: its location, pinned to the recorded digest
        from landlens.models.classifier import run_weights_argument

        return run_weights_argument(ref, recorded.get("digest"))
    if source == "file":
        return ref
    if source == "hub":
        family, _, name = ref.partition("/")  # 'timm/arch.tag' or 'torchvision/arch.WEIGHTS'
        return "hub:" + (name.split(".", 1)[1] if family == "torchvision" and "." in name else name)
    raise SearchIndexError(
        f"the index's features come from a backbone with weights {source!r} ({ref}); they cannot be "
        f"rebuilt to embed queries: extract the features with saved weights (a checkpoint file, "
        f"packaged or hub weights) and index them again"
    )


def check_backbone(index: SearchIndex, backbone: Any) -> None:
    """Refuse a backbone whose features are not those the index holds: another architecture,
    other weights (digest), other preprocessing or another feature length."""
    ident = recorded_identity(index)
    recorded_w = index.meta.get("backbone", {}).get("weights", {})
    got = {"backbone": backbone.name, "weights_digest": backbone.weights.digest,
           "preprocessing": backbone.preprocessing.to_dict(), "num_features": backbone.num_features}
    want = {"backbone": ident.get("backbone"), "weights_digest": ident.get("weights_digest"),
            "preprocessing": ident.get("preprocessing"), "num_features": index.dim_}
    diffs = [key for key in want if want[key] != got[key]]
    if diffs:
        def show(d: dict[str, Any], w: dict[str, Any] | None) -> str:
            where = f" ({w.get('source')}: {w.get('ref')})" if w else ""
            parts = {"backbone": f"{d['backbone']}{where}",
                     "weights_digest": f"weights digest {str(d['weights_digest'])[:16]}",
                     "preprocessing": f"preprocessing {json.dumps(d['preprocessing'], sort_keys=True)}",
                     "num_features": f"{d['num_features']}-d features"}
            return ", ".join(parts[k] for k in ["backbone", *[k for k in diffs if k != "backbone"]])

        raise SearchIndexError(f"index was built with {show(want, recorded_w)}; this backbone gives "
                               f"{show(got, backbone.weights.to_dict())}")


def backbone_for_index(index: SearchIndex, weights: str | None = None) -> Any:
    """Rebuild the feature extractor recorded in an index built by :func:`~landlens.retrieval.index.build_index_from_store`.

    The weights are reloaded from where the store says they came from (the packaged file, the
    checkpoint path, or the hub tag), or from ``weights`` (any ``create_backbone`` weights
    argument, e.g. a checkpoint that moved); the recorded preprocessing is applied, and the
    result must have the recorded weights digest (:func:`check_backbone`).
    """
    from landlens.models.preprocessing import Preprocessing
    from landlens.models.registry import create_backbone

    ident = recorded_identity(index)
    recorded = index.meta.get("backbone", {}).get("weights", {})
    arg = weights if weights is not None else weights_argument(recorded)
    try:
        pre = Preprocessing.from_dict(ident["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SearchIndexError(f"the index records an unusable preprocessing: {first_line(exc)}") from None
    try:
        bb = create_backbone(ident["backbone"], arg, preprocessing=pre)
    except LandlensError as exc:
        raise type(exc)(f"{exc} (rebuilding the backbone of the index, whose weights came from "
                        f"{recorded.get('source')}: {recorded.get('ref')}; pass other weights to point at them)") from None
    check_backbone(index, bb)
    return bb


def decode_queries(index: SearchIndex, paths: Sequence[str | Path], *, max_pixels: int | None = None) -> list[Any]:
    """Decode query images to RGB exactly as the indexed features were decoded (same JPEG draft
    size and band choice), ready for the backbone's preprocessing.

    Raises:
        ImageReadError: a query that is missing or not a readable image, or larger than
            ``max_pixels`` (default :data:`~landlens.data.io.DEFAULT_MAX_PIXELS`), naming the file.
    """
    from landlens.data.io import DEFAULT_MAX_PIXELS
    from landlens.models.preprocessing import Preprocessing, decode_image

    ident = recorded_identity(index)
    pre = Preprocessing.from_dict(ident["preprocessing"])
    bands = ident.get("rgb_bands")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    return [decode_image(p, pre, rgb_bands=bands, max_pixels=limit) for p in paths]


def embed_images(backbone: Any, images: Sequence[Any], batch_size: int = 32,
                 forward: Any = None) -> np.ndarray:
    """Backbone features (n, num_features) of RGB PIL images, under the backbone's preprocessing.

    ``forward``: a prepared graph of the backbone
    (:func:`landlens.features.extract.optimize_for_inference`) to run instead of eager mode; it
    gets channels-last batches, the layout it was prepared for.
    """
    import torch

    from landlens.models.preprocessing import preprocess_images

    model = backbone.eval() if forward is None else forward
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = preprocess_images(list(images[s:s + batch_size]), backbone.preprocessing)
            if forward is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().flatten(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.num_features), np.float32)


__all__ = ["backbone_for_index", "check_backbone", "decode_queries", "embed_images", "recorded_identity",
           "weights_argument"]
