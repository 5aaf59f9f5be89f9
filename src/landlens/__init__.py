"""landlens: remote-sensing scene retrieval and classification.

The public API, in the order data flows (every ``landlens`` command is a thin shell over one
of these)::

    import landlens

    bb = landlens.create_backbone("tf_efficientnet_lite0", "package")   # backbone + its preprocessing
    fs = landlens.extract("UCMerced_LandUse", bb)                        # FeatureSet, cached in runs/features
    both = landlens.fuse([fs, landlens.extract("UCMerced_LandUse", "tv_mobilenet_v2")])
    print(landlens.evaluate(both).metrics["mAP"])                        # mAP, ANMRR, P@k, class-wise mAP
    best = landlens.extract("UCMerced_LandUse", "fusion")                # four offline backbones as one
    arch = landlens.Archive.build("UCMerced_LandUse", "ucm.archive")     # fusion + k-reciprocal by default
    hits = arch.search("query.jpg", k=10)                                # by file, image, vector or id
    landlens.align_text("UCMerced_LandUse", "captions.json", "words.safetensors")   # image-text heads
    arch.enable_text("words.safetensors"); arch.search_text("harbor with many boats", k=10)
    run = landlens.train(landlens.load_config("benchmarks/configs/ucm_linear.yaml"))
    scenes = landlens.Archive.build_from_scenes(["a.tif", "b.tif"], "a.archive", chip=256, gsd=0.3)
    ref, _ = landlens.query_at(scenes, 121.0, 14.6)                      # a place -> the chip holding it
    doc = landlens.results_geojson(scenes, landlens.search_files(scenes, [ref], k=10))   # GeoJSON hits
    landlens.classify_scene("runs/eurosat", "landsat.tif", "landuse.tif", gsd=10, chip=64)  # land-use map
    landlens.similarity_map(scenes, ref, "c.tif", "similar.tif")                   # where else looks like this
    rows = landlens.NpyRows("vectors.npy")                               # more vectors than RAM holds:
    big = landlens.build_disk_index(rows, rows.n, rows.dim, "big.index") # IVF-PQ, lists on disk

The package is organised along that flow: ``scenes`` (GeoTIFF scenes read by windows, tiled
into chips) -> ``data`` (catalog, decoding, folders, splits) ->
``models`` (backbones, weights, preprocessing) -> ``features`` (extraction, the feature store
and its cache) -> ``retrieval`` (fusion, archives, search, re-ranking, metrics) ->
``training`` / ``matching`` (learned models) -> ``service`` (the web service). Names below are
imported on first use, so ``import landlens`` stays light.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("landlens")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"

_EXPORTS: dict[str, str] = {
    # data
    "scan_folder": "landlens.data.folder",
    "load_rgb": "landlens.data.io",
    "make_split": "landlens.data.splits",
    # scenes
    "open_scene": "landlens.scenes.reader",
    "tile_scene": "landlens.scenes.tiling",
    # models
    "create_backbone": "landlens.models.registry",
    "create_text_tower": "landlens.models.text",
    "Preprocessing": "landlens.models.preprocessing",
    "decode_image": "landlens.models.preprocessing",
    # features
    "extract": "landlens.features.cache",
    "FeatureSet": "landlens.features.store",
    "FeatureStore": "landlens.features.store",
    # retrieval
    "fuse": "landlens.features.fusion",
    "Archive": "landlens.retrieval.archive",
    "ArchiveHit": "landlens.retrieval.search",
    "evaluate": "landlens.retrieval.evaluate",
    "make_reranker": "landlens.retrieval.rerank",
    "build_disk_index": "landlens.retrieval.ondisk",
    "DiskIndex": "landlens.retrieval.ondisk",
    "NpyRows": "landlens.retrieval.ondisk",
    "DiskIndexSettings": "landlens.retrieval.ondisk",
    # search by words
    "Alignment": "landlens.retrieval.alignment",
    "align_text": "landlens.retrieval.textstudy",
    "clip_alignment": "landlens.retrieval.textstudy",
    "evaluate_text": "landlens.retrieval.textstudy",
    "open_text_space": "landlens.retrieval.textspace",
    "search_files": "landlens.retrieval.search",
    "query_at": "landlens.retrieval.geo",
    "results_geojson": "landlens.retrieval.geo",
    "similarity_map": "landlens.retrieval.geo",
    # training
    "TrainConfig": "landlens.training.config",
    "load_config": "landlens.training.config",
    "train": "landlens.training.engine",
    "Predictor": "landlens.training.predict",
    "classify_scene": "landlens.training.landuse",
    "ZeroShotPredictor": "landlens.training.predict",
    # errors
    "LandlensError": "landlens.errors",
}

__all__ = [
    "__version__",
    "Alignment",
    "Archive",
    "ArchiveHit",
    "DiskIndex",
    "DiskIndexSettings",
    "FeatureSet",
    "FeatureStore",
    "LandlensError",
    "NpyRows",
    "Predictor",
    "Preprocessing",
    "TrainConfig",
    "ZeroShotPredictor",
    "align_text",
    "build_disk_index",
    "classify_scene",
    "clip_alignment",
    "create_backbone",
    "create_text_tower",
    "decode_image",
    "evaluate",
    "evaluate_text",
    "extract",
    "fuse",
    "load_config",
    "load_rgb",
    "make_reranker",
    "make_split",
    "open_scene",
    "open_text_space",
    "query_at",
    "results_geojson",
    "scan_folder",
    "search_files",
    "similarity_map",
    "tile_scene",
    "train",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from landlens.data.folder import scan_folder
    from landlens.data.io import load_rgb
    from landlens.data.splits import make_split
    from landlens.errors import LandlensError
    from landlens.features.cache import extract
    from landlens.features.store import FeatureSet, FeatureStore
    from landlens.models.preprocessing import Preprocessing, decode_image
    from landlens.models.registry import create_backbone
    from landlens.models.text import create_text_tower
    from landlens.retrieval.alignment import Alignment
    from landlens.retrieval.archive import Archive
    from landlens.retrieval.evaluate import evaluate
    from landlens.features.fusion import fuse
    from landlens.retrieval.rerank import make_reranker
    from landlens.retrieval.ondisk import DiskIndex, DiskIndexSettings, NpyRows, build_disk_index
    from landlens.retrieval.geo import query_at, results_geojson, similarity_map
    from landlens.retrieval.search import ArchiveHit, search_files
    from landlens.scenes.reader import open_scene
    from landlens.scenes.tiling import tile_scene
    from landlens.training.config import TrainConfig, load_config
    from landlens.training.engine import train
    from landlens.training.landuse import classify_scene
    from landlens.training.predict import Predictor, ZeroShotPredictor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'landlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
