"""Batched feature extraction into a :class:`~landlens.features.store.FeatureStore`.

Images are decoded, resized and cropped in worker processes and travel as ``uint8`` arrays;
the main process normalises each batch once, in channels-last layout, and runs the backbone
under ``torch.inference_mode``, prepared for inference by :func:`optimize_for_inference` (run by
ONNX Runtime, compiled, or traced and frozen: batch-norm folded into convolutions, weights
prepacked), falling back to eager mode where a model cannot be optimised. Features are written
in whole chunks, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from landlens.errors import ImageReadError, LandlensError
from landlens.features.inference import COMPILE_MIN_IMAGES, Optimize, noise_batch, optimize_for_inference
from landlens.features.store import ChunkAssembler, FeatureStore
from landlens.models.preprocessing import Preprocessing, load_resized, normalize_batch
from landlens.models.registry import Backbone

Engine = Literal["local", "ray"]


class DecodeDataset(Dataset):
    """Decodes and resizes one image per index; failures come back as a reason, not an error."""

    def __init__(self, root: Path, paths: Sequence[str], pre: Preprocessing, max_pixels: int | None = None,
                 rgb_bands: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.pre = pre
        self.max_pixels = max_pixels
        self.rgb_bands = tuple(rgb_bands) if rgb_bands is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, str | None]:
        path = self.root / self.paths[i]
        try:
            kwargs: dict[str, Any] = {"rgb_bands": self.rgb_bands}
            if self.max_pixels is not None:
                kwargs["max_pixels"] = self.max_pixels
            return load_resized(path, self.pre, **kwargs), i, None
        except ImageReadError as exc:
            return None, i, exc.reason


def _collate(batch: list[tuple[np.ndarray | None, int, str | None]]):
    ok = [(a, i) for a, i, r in batch if a is not None]
    bad = [(i, r) for a, i, r in batch if a is None]
    x = torch.from_numpy(np.stack([a for a, _ in ok])) if ok else None
    return x, [i for _, i in ok], bad


@dataclass
class ExtractResult:
    store: Path
    n_items: int
    n_extracted: int  # this run
    n_failed: int
    seconds: float
    meta: dict[str, Any]

    @property
    def images_per_second(self) -> float:
        return self.n_extracted / self.seconds if self.seconds > 0 else float("nan")


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n))


def extract_features(
    root: str | Path,
    paths: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    backbone: Backbone,
    out: str | Path,
    *,
    dataset_name: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    chunk_size: int = 1024,
    strict: bool = False,
    overwrite: bool = False,
    optimize: Optimize = "auto",
    max_pixels: int | None = None,
    rgb_bands: Sequence[int] | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    engine: Engine = "local",
    address: str | None = None,
    actors: int | None = None,
) -> ExtractResult:
    """Extract ``backbone`` features of the images ``root/paths`` into the store ``out``.

    Unreadable images are skipped and listed in the store's meta (their rows are NaN and
    marked invalid); with ``strict=True`` the first one stops the run after the chunks
    already finished have been saved. Rerunning the same call resumes an interrupted store.

    ``engine="ray"`` runs on Ray Data (:mod:`landlens.features.ray_engine`: ``address`` of the
    cluster, ``actors`` backbone replicas; ``workers`` is then unused) into the same store.
    """
    if batch_size <= 0 or chunk_size <= 0:
        raise LandlensError("--batch-size and --chunk-size must be positive")
    if engine not in ("local", "ray"):
        raise LandlensError(f"unknown engine {engine!r}: local or ray")
    if engine == "local" and (address is not None or actors is not None):
        raise LandlensError("--address and --actors go with --engine ray")
    store = FeatureStore(out)
    pre = backbone.preprocessing
    identity = {
        "backbone": backbone.name,
        "arch": f"{backbone.spec.family}/{backbone.spec.arch}",
        "num_features": backbone.num_features,
        "weights_digest": backbone.weights.digest,
        "preprocessing": pre.to_dict(),
        "rgb_bands": list(rgb_bands) if rgb_bands is not None else None,
    }
    dataset_info = {"name": dataset_name, "root": str(Path(root).resolve()), "classes": list(classes)}
    meta = store.begin(identity, dataset_info, paths, labels, chunk_size, overwrite=overwrite,
                       extra={"backbone": backbone.describe(), **(extra_meta or {})})
    n = len(paths)
    t0 = time.perf_counter()
    if meta.get("status") == "complete":
        return ExtractResult(store.root, n, 0, sum(1 for _ in meta["failures"]), 0.0, meta)

    done = store.completed_chunks()
    n_chunks = int(meta["n_chunks"])
    pending = [c for c in range(n_chunks) if c not in done]
    todo = [i for c in pending for i in range(c * chunk_size, min(n, (c + 1) * chunk_size))]
    prepare = 0.0
    if todo and engine == "ray":
        from landlens.features.ray_engine import run_ray

        prepare = run_ray(root, paths, backbone, store, todo, chunk_size, n, batch_size=batch_size, strict=strict,
                          optimize=optimize, max_pixels=max_pixels, rgb_bands=rgb_bands, progress=progress,
                          address=address, actors=actors)
    elif todo:
        prepare = _run(root, paths, backbone, store, todo, chunk_size, n, batch_size,
                            default_workers() if workers is None else workers, strict, optimize, max_pixels,
                            rgb_bands, progress)
    seconds = time.perf_counter() - t0
    meta = store.finalize(store.read_meta(), backbone.num_features)
    loop = seconds - prepare
    meta = store.update_meta(last_run={"seconds": round(seconds, 3), "prepare_seconds": round(prepare, 3),
                                       "images": len(todo), "engine": engine,
                                       "images_per_second": round(len(todo) / loop, 2) if loop > 0 else None})
    return ExtractResult(store.root, n, len(todo), len(meta["failures"]), seconds, meta)


def _run(root, paths, backbone, store, todo, chunk_size, n, batch_size, workers, strict, optimize,
         max_pixels, rgb_bands, progress) -> float:
    """Extract ``todo``; returns the seconds spent preparing the optimised graph."""
    pre = backbone.preprocessing
    ds = DecodeDataset(Path(root), paths, pre, max_pixels, rgb_bands)
    loader = DataLoader(
        torch.utils.data.Subset(ds, todo), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    example = noise_batch(pre, batch_size)
    t_prep = time.perf_counter()
    model = optimize_for_inference(backbone, example, optimize, n_images=len(todo))
    prepare = time.perf_counter() - t_prep

    chunks = ChunkAssembler(store, n, chunk_size, backbone.num_features)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc=f"extract {backbone.name}", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for x, idx, bad in loader:
                for i, reason in bad:
                    if strict:
                        raise ImageReadError(Path(root) / paths[i], reason)
                    chunks.add(i, None, {"path": paths[i], "reason": reason})
                if x is not None:
                    real = x.shape[0]
                    if real < batch_size:  # keep one input shape for traced/compiled graphs
                        x = torch.cat([x, x[-1:].expand(batch_size - real, *x.shape[1:])])
                    f = model(normalize_batch(x, pre)).float().flatten(1)[:real].numpy()
                    for row, i in enumerate(idx):
                        chunks.add(i, f[row])
                if bar is not None:
                    bar.update(len(idx) + len(bad))
    finally:
        if bar is not None:
            bar.close()
    return prepare


__all__ = ["COMPILE_MIN_IMAGES", "DecodeDataset", "ExtractResult", "Optimize", "default_workers", "extract_features",
           "noise_batch", "optimize_for_inference"]
