"""Retrieval evaluation from sources to a results document: what ``landlens retrieval evaluate``
runs, callable from Python.

:func:`evaluate_sources` takes a folder of class sub-folders and one or more backbones (features
extracted once into the shared cache, several backbones fused), or an archive (its vectors as
indexed), resolves the protocol, ranks by a distance (optionally the learned matching metric or
an unsupervised re-ranker) and returns the :class:`~landlens.retrieval.evaluate.EvaluationResult`
with a JSON-able document that records the command, versions, data, backbones, fusion and split.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from landlens.errors import LandlensError
from landlens.features.cache import DEFAULT_CACHE_DIR, cached_store
from landlens.features.fusion import align, fuse
from landlens.features.store import FeatureSet
from landlens.retrieval.evaluate import EvaluationResult, evaluate
from landlens.retrieval.metrics import DEFAULT_CONFUSION_K, DEFAULT_PRECISION_AT, NoRelevantWarning
from landlens.retrieval.protocols import resolve_protocol


def _check(archive: Any, backbones: Sequence[str], weights: Sequence[str], pca: int | None, confusion_k: int,
           protocol: str, manifest: Any, database: str, distance: str, matcher: Any, shortlist: int | None,
           rerank: str | None, data: Any) -> None:
    """Refuse inconsistent settings before any extraction (one line each, as the CLI prints them)."""
    if archive is not None and backbones:
        raise LandlensError(f"{data} is an archive: its vectors are evaluated as indexed; drop --backbone")
    if archive is None and not backbones:
        raise LandlensError("give --backbone (repeat it to fuse several), or DATA an archive folder")
    if len(weights) not in (1, max(1, len(backbones))):
        raise LandlensError(f"--weights: give one value for every backbone or one per --backbone "
                            f"({len(backbones)} backbones, {len(weights)} --weights)")
    if pca is not None and pca < 1:
        raise LandlensError(f"--pca {pca}: the number of components must be >= 1")
    if confusion_k < 1:
        raise LandlensError(f"--confusion-k {confusion_k}: must be >= 1")
    if protocol == "archive" and manifest is not None:
        raise LandlensError("--split is for --protocol split; drop it or add --protocol split")
    if protocol == "split" and manifest is None:
        raise LandlensError("--protocol split needs --split FILE (make one with `landlens data split`)")
    if protocol == "archive" and database != "archive-minus-query":
        raise LandlensError("--database test needs --protocol split")
    if (distance == "learned") != (matcher is not None):
        raise LandlensError("--distance learned and --matcher DIR go together (the discriminator to rank with)")
    if shortlist is not None and (distance != "learned" or shortlist < 1):
        raise LandlensError("--shortlist K (K >= 1) applies to --distance learned")
    if rerank is not None:
        from landlens.retrieval.rerank import make_reranker

        if distance != "cosine":
            raise LandlensError(f"--rerank ranks by cosine similarity; drop --distance {distance} or --rerank")
        make_reranker(rerank)  # a bad spec fails before any extraction


def _resolve_rerank(rerank: str | None, archive: Any, distance: str, pca: int | None, whiten: bool) -> str | None:
    """``"none"`` as ``None``; ``"auto"`` as the archive's own re-ranking or the default pipeline's."""
    from landlens.retrieval.rerank import DEFAULT_RERANK

    if rerank is None or rerank.strip().lower() == "none":
        return None
    if rerank.strip().lower() != "auto":
        return rerank
    if distance != "cosine":
        return None
    if archive is not None:
        return archive.rerank
    return DEFAULT_RERANK if pca is None and not whiten else None


def _folder_sources(data: Any, dataset: str | None, backbones: Sequence[str], weights: Sequence[str],
                    cache_dir: Any, workers: int | None, progress: bool, command: str | None,
                    say: Callable[[str], None]) -> tuple[list[FeatureSet], list[dict[str, Any]], dict[str, Any]]:
    from landlens.data.folder import scan_folder
    from landlens.models.registry import create_backbone

    ds = scan_folder(data, dataset)
    per_backbone = list(weights) if len(weights) == len(backbones) else list(weights) * len(backbones)
    sets, records = [], []
    for name, w in zip(backbones, per_backbone):
        bb = create_backbone(name, w)
        fs, path, reused, secs = cached_store(ds, bb, cache_dir=cache_dir, workers=workers, progress=progress,
                                              command=command)
        say(f"features  {bb.name}: {len(fs)} images x {fs.features.shape[1]} "
            f"({'reused' if reused else f'extracted in {secs:.1f} s'}) {path}")
        meta = fs.meta or {}
        records.append({"backbone": bb.name, "weights_option": w,
                        "weights": (meta.get("backbone") or {}).get("weights", bb.weights.to_dict()),
                        "identity": meta.get("identity"), "describe": meta.get("backbone"), "store": str(path),
                        "reused": bool(reused), "images": len(fs), "dim": int(fs.features.shape[1]),
                        "unreadable": len(meta.get("failures", []))})
        sets.append(fs)
    data_doc = {"path": str(data), "root": str(ds.root), "dataset": ds.name, "images": len(ds.paths),
                "classes": list(ds.classes)}
    return sets, records, data_doc


def evaluate_sources(
    data: str | os.PathLike[str],
    backbones: Sequence[str] = (),
    weights: Sequence[str] = ("auto",),
    *,
    dataset: str | None = None,
    distance: str = "cosine",
    matcher: str | os.PathLike[str] | None = None,
    shortlist: int | None = None,
    protocol: str = "archive",
    split: str | os.PathLike[str] | None = None,
    database: str = "archive-minus-query",
    pca: int | None = None,
    whiten: bool = False,
    rerank: str | None = None,
    precision_at: Sequence[int] = DEFAULT_PRECISION_AT,
    confusion_k: int = DEFAULT_CONFUSION_K,
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
    workers: int | None = None,
    progress: bool = False,
    command: str | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> tuple[EvaluationResult, dict[str, Any]]:
    """Evaluate retrieval on ``data`` (a class-folder dataset with ``backbones``, fused when
    several, optionally PCA/whitened; or an archive, with no backbone) and describe the run.

    ``split`` is a split manifest file for ``protocol="split"``; ``distance="learned"`` ranks by
    the discriminator at ``matcher`` (``shortlist``: re-rank only each query's K Euclidean
    neighbours); ``rerank`` is an unsupervised re-ranking spec, ``"none"``, or ``"auto"``: an
    archive's own re-ranking, or for a folder :data:`~landlens.retrieval.rerank.DEFAULT_RERANK`
    (cosine distance only, and for a folder without PCA or whitening). ``say`` receives one line per
    feature source. Returns the result and the JSON document ``landlens retrieval evaluate``
    writes.

    Raises:
        LandlensError: inconsistent settings (checked before any extraction), unusable data.
    """
    import numpy as np
    import torch

    from landlens import __version__
    from landlens.data.splits import SplitManifest
    from landlens.retrieval.archive import Archive, is_archive

    archive = Archive.open(data) if is_archive(data) else None
    manifest = SplitManifest.load(split) if split is not None else None
    rerank = _resolve_rerank(rerank, archive, distance, pca, whiten)
    _check(archive, backbones, weights, pca, confusion_k, protocol, manifest, database, distance, matcher,
           shortlist, rerank, data)
    if archive is not None:
        fs = archive.feature_set()
        sets = [fs]
        records = [{"backbone": archive.backbone_name, "archive": str(data), "generation": archive.generation,
                    "identity": fs.meta.get("identity"), "images": len(fs), "dim": int(fs.features.shape[1])}]
        say(f"features  {archive.backbone_name}: {len(fs)} labelled images x {fs.features.shape[1]} "
            f"from archive {data} (generation {archive.generation})")
        data_doc = {"path": str(data), "root": str(data), "dataset": fs.meta["dataset"]["name"], "images": len(fs),
                    "classes": list(fs.classes)}
    else:
        sets, records, data_doc = _folder_sources(data, dataset, backbones, weights, cache_dir, workers, progress,
                                                  command, say)
    if len(sets) > 1 or pca is not None or whiten:
        aligned = align(sets)
        p = resolve_protocol(aligned[0], protocol, manifest=manifest, database=database)
        everything = p.n_database == len(aligned[0])
        features = fuse(aligned, pca_dim=pca, whiten=whiten, fit_on=None if everything else p.database_indices)
    else:
        features = sets[0]
        p = resolve_protocol(features, protocol, manifest=manifest, database=database)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRelevantWarning)  # reported in the summary's notes
        dist: object = distance
        if distance == "learned":  # the matching discriminator, named by its registered distance
            from landlens.retrieval.distances import get_distance

            dist = get_distance("learned", model=matcher, shortlist=shortlist, features=features)
        result = evaluate(features, distance=dist, protocol=p, precision_at=precision_at, confusion_k=confusion_k,
                          rerank=rerank)
    doc = {
        "command": command,
        "versions": {"landlens": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "data": data_doc,
        "backbones": records,
        "fusion": (features.meta or {}).get("fusion"),
        "split": None if manifest is None else {
            "path": str(Path(split)), "kind": manifest.kind, "seed": manifest.seed, "ratios": manifest.ratios,
            "source_digest": manifest.source_digest, "sizes": {k: len(v) for k, v in manifest.parts.items()}},
        **result.to_dict(),
    }
    return result, doc


__all__ = ["evaluate_sources"]
