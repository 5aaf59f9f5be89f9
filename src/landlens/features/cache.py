"""Reuse extracted features: one feature store per (image list, backbone, weights, preprocessing).

Every command that needs the features of a folder (``landlens quickstart``, ``retrieval
evaluate``, ``train baseline``, ``index build``, matching) calls :func:`cached_features` or
:func:`ensure_features`; the first call extracts into
``CACHE/<dataset>-<folder and items digest>/<backbone>-<weights digest>-<preprocessing digest>``
(``runs/features`` by default), later calls (and an interrupted first call) reuse that store.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from landlens.features.extract import ExtractResult, Optimize, extract_features
from landlens.features.store import FeatureSet, FeatureStore, items_digest
from landlens.models.registry import Backbone, create_backbone

DEFAULT_CACHE_DIR = Path("runs/features")


def _short_hash(obj: object, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def store_path(cache_dir: str | Path, dataset_name: str, paths: Sequence[str], labels: Sequence[int],
               backbone: Backbone, root: str | Path) -> Path:
    """Where the features of these images under ``backbone`` live in the cache. ``root`` is the
    folder the relative ``paths`` lie in: the same names under another folder (a copy, another
    version of a dataset) are other images, with a store of their own that records their folder."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_name) or "images"
    weights = (backbone.weights.digest or "random")[:12]
    key = _short_hash([str(Path(root).resolve()), items_digest(paths, labels)])
    return (Path(cache_dir) / f"{slug}-{key}"
            / f"{backbone.name}-{weights}-{_short_hash(backbone.preprocessing.to_dict(), 8)}")


def cached_features(
    data: str | Path,
    dataset: str | None = None,
    backbone: str | Backbone = "tf_efficientnet_lite0",
    weights: str = "auto",
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    workers: int | None = None,
    optimize: Optimize = "auto",
    progress: bool = True,
    command: str | None = None,
) -> FeatureSet:
    """Features of every readable image under ``data``, extracted once and then reused.

    ``backbone`` is a name (built with ``weights``) or an already built :class:`Backbone`
    (``weights`` is then ignored). Random weights cannot be cached meaningfully, so
    ``weights='none'`` is refused.
    """
    from landlens.data.folder import scan_folder

    ds = scan_folder(data, dataset)
    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
    return cached_store(ds, bb, cache_dir=cache_dir, workers=workers, optimize=optimize, progress=progress,
                        command=command)[0]


def cached_store(ds: Any, backbone: Backbone, *, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                 workers: int | None = None, optimize: Optimize = "auto", progress: bool = True,
                 command: str | None = None) -> tuple[FeatureSet, Path, bool, float]:
    """The readable images' features of the scanned dataset ``ds`` under a built backbone, from the
    cache (extracted first when needed), with what a results file records about them:
    ``(features, store folder, reused a complete store, seconds spent)``.

    Raises:
        LandlensError: randomly initialised weights, whose features cannot be cached meaningfully.
    """
    from landlens.errors import LandlensError

    if backbone.weights.digest is None:
        raise LandlensError(f"features of randomly initialised {backbone.name!r} cannot be cached; "
                            "pass real --weights")
    t0 = time.perf_counter()
    out, extracted = ensure_features(ds, backbone, cache_dir=cache_dir, workers=workers, optimize=optimize,
                                     progress=progress, command=command)
    fs = FeatureStore(out).load().only_valid()
    return fs, out, extracted is None, time.perf_counter() - t0


def extract(
    data: str | Path | Sequence[str | Path],
    backbone: str | Backbone = "tf_efficientnet_lite0",
    weights: str = "auto",
    *,
    dataset: str | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    workers: int | None = None,
    optimize: Optimize = "auto",
    progress: bool = False,
) -> FeatureSet:
    """Features of images under ``backbone``: extracted once into the feature cache, then reused.

    ``data`` is a folder with one sub-folder per class (a catalog dataset is recognised, or
    named by ``dataset``), or a list of image files, whose classes are their parent folders'
    names. ``backbone`` is a name from ``landlens models list`` (any timm model name, ``hog``,
    ``lbp_rgb``, ``run:PATH``) built with ``weights`` (``auto``, ``package``, ``hub``, a file),
    or a built :class:`~landlens.models.registry.Backbone`. Unreadable images are left out of
    the result (the store records why). The cache is shared with every landlens command, so
    ``landlens retrieval evaluate`` on the same images reuses it.
    """
    from landlens.data.folder import scan_files, scan_folder

    ds = scan_files(data) if not isinstance(data, (str, Path)) else scan_folder(data, dataset)
    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
    return cached_store(ds, bb, cache_dir=cache_dir, workers=workers, optimize=optimize, progress=progress)[0]


def ensure_features(ds: Any, backbone: Backbone, *, cache_dir: str | Path = DEFAULT_CACHE_DIR,
                    workers: int | None = None, optimize: Optimize = "auto", progress: bool = True,
                    command: str | None = None, **engine: Any) -> tuple[Path, ExtractResult | None]:
    """The cache's store of the scanned dataset ``ds`` under ``backbone``, extracted (or
    finished, after an interruption) when not complete yet: ``(store folder, what this call
    extracted or None)``. ``engine``: ``engine``, ``address``, ``actors`` of
    :func:`~landlens.features.extract.extract_features` (``engine="ray"``: on Ray Data)."""
    out = store_path(cache_dir, ds.name, ds.paths, ds.labels, backbone, ds.root)
    store = FeatureStore(out)
    if store.exists() and store.read_meta().get("status") == "complete":
        return out, None
    rgb = getattr(ds.spec, "rgb_bands", None) if ds.spec is not None else None
    res = extract_features(ds.root, ds.paths, ds.labels, ds.classes, backbone, out, dataset_name=ds.name,
                           workers=workers, optimize=optimize, rgb_bands=rgb, progress=progress,
                           extra_meta={"command": command} if command else None,
                           **{k: v for k, v in engine.items() if v is not None})
    return out, res


__all__ = ["DEFAULT_CACHE_DIR", "cached_features", "cached_store", "ensure_features", "extract", "store_path"]
