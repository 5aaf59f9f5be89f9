"""Feature extraction on Ray Data: decoding in Ray tasks, the backbone in a pool of actors.

``extract_features(..., engine="ray")`` (``landlens features extract DATA --engine ray``,
``landlens index build DATA --engine ray``) runs the images still missing from a feature store
through Ray Data's batch-inference pattern::

    from_items(image rows)  ->  map_batches(decode_batch)      stateless tasks: the one decode path,
                                                               load_resized (decode, resize, crop)
                            ->  map_batches(Embedder, ...)     an actor pool: one backbone per actor,
                                                               optimised once (optimize_for_inference)
                            ->  iter_batches on the driver     whole chunks, each written once

The store is the local engine's (:class:`~landlens.features.store.FeatureStore`): the same
meta, the same chunks of ``chunk_size`` images, the same final ``features.npy``. A run of either
engine resumes the other at chunk level, and their features agree to float rounding
(``tests/features/test_ray_engine.py`` measures it).

**Faults.** Ray Data restarts an actor that dies and retries its batches (its actor pools
default to unlimited ``max_restarts`` and ``max_task_retries``); a batch delivered twice is
written once, because the
driver keeps, per open chunk, which rows it already has, and writes a chunk (atomically) only
when all its rows are in.

**Clusters.** ``address``: ``None`` starts Ray on this machine (``num_cpus``), ``"auto"``
joins the cluster this machine belongs to (``ray start --head`` / ``ray start --address``),
``"ray://HOST:10001"`` connects through Ray Client. The decode tasks read the images where they
run, so every node must see the data at the same path (a shared or replicated file system);
the backbone travels to the actors through Ray's object store, so worker nodes need no weights.
Ray is imported only here, on first use: the local engine never imports it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landlens.errors import ImageReadError, LandlensError

DECODE_CPU = 0.25
"""CPUs a decode task reserves (decoding a chip is light next to the backbone's forward pass)."""

FAULT_ENV = "LANDLENS_RAY_EXIT_ONCE"
"""Fault injection for tests: a file path; the first actor to see it missing creates it and exits."""


def ray_module() -> Any:
    """``ray`` with Ray Data, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate extra of ray
    except ImportError:
        raise LandlensError("--engine ray needs Ray Data: pip install 'landlens[ray]' "
                            "(or pip install 'ray[data]')") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Start or join Ray once per process (module docstring); returns the ``ray`` module."""
    ray = ray_module()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "ignore_reinit_error": True}
        if address:
            ray.init(address=address, **kwargs)
        else:  # "local": a new instance, even where a cluster started by `ray start` runs
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    return ray


def decode_batch(batch: dict[str, np.ndarray], root: str, pre: dict[str, Any], max_pixels: int | None,
                 rgb_bands: Sequence[int] | None) -> dict[str, np.ndarray]:
    """A Ray task: the images of a batch of rows (``i``, ``path``) as network inputs ``x``
    (``(B, S, S, 3)`` uint8, zeros where ``ok`` is false and ``reason`` says why)."""
    from landlens.models.preprocessing import Preprocessing, load_resized

    p = Preprocessing.from_dict(pre)
    side = p.input_size
    xs, ok, reasons = [], [], []
    for rel in batch["path"]:
        kwargs: dict[str, Any] = {"rgb_bands": rgb_bands}
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        try:
            xs.append(load_resized(Path(root) / str(rel), p, **kwargs))
            ok.append(True)
            reasons.append("")
        except ImageReadError as exc:
            xs.append(np.zeros((side, side, 3), np.uint8))
            ok.append(False)
            reasons.append(exc.reason)
    return {"i": np.asarray(batch["i"], np.int64), "ok": np.array(ok, bool), "reason": np.array(reasons, object),
            "x": np.stack(xs)}


class Embedder:
    """A Ray actor: one backbone, prepared once for inference, turning decoded batches into
    features ``f`` (``(B, dim)`` float32, NaN where the image could not be read)."""

    def __init__(self, backbone: Any, optimize: str, batch_size: int, threads: int, n_images: int) -> None:
        import torch

        from landlens.features.inference import noise_batch, optimize_for_inference

        torch.set_num_threads(max(1, int(threads)))
        self.backbone = backbone.eval()
        self.batch_size = int(batch_size)
        # n_images: this actor's share, so "auto" compiles only where the local engine would too
        self.model = optimize_for_inference(self.backbone, noise_batch(backbone.preprocessing, self.batch_size),
                                            optimize, n_images=int(n_images))  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from landlens.models.preprocessing import normalize_batch

        flag = os.environ.get(FAULT_ENV)
        if flag and not os.path.exists(flag):
            Path(flag).touch()
            os._exit(1)  # the actor dies mid-run (tests)
        ok = np.asarray(batch["ok"], bool)
        f = np.full((len(ok), self.backbone.num_features), np.nan, np.float32)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["x"][ok]))
            real = x.shape[0]
            if real < self.batch_size:  # one input shape for the prepared graph, as the local engine
                x = torch.cat([x, x[-1:].expand(self.batch_size - real, *x.shape[1:])])
            with torch.inference_mode():
                out = self.model(normalize_batch(x, self.backbone.preprocessing)).float().flatten(1)
            f[ok] = out[:real].numpy()
        return {"i": batch["i"], "ok": ok, "reason": batch["reason"], "f": f}


def run_ray(root: str | Path, paths: Sequence[str], backbone: Any, store: Any, todo: Sequence[int], chunk_size: int,
            n: int, *, batch_size: int, strict: bool, optimize: str, max_pixels: int | None,
            rgb_bands: Sequence[int] | None, progress: bool, address: str | None = None,
            actors: int | None = None, num_cpus: int | None = None) -> float:
    """Extract the images ``todo`` (indices into ``paths``) into ``store`` on Ray (module
    docstring); ``actors`` backbone replicas (default: one per two CPUs of the cluster, at least
    one). Returns the seconds spent before the first features arrived (start-up)."""
    ray = connect(address, num_cpus)
    t0 = time.perf_counter()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, cpus // 2) if actors is None else int(actors)
    if actors < 1:
        raise LandlensError(f"--actors {actors}: at least one")
    # Ray schedules by reserved CPUs, per node: the actors together reserve three quarters of the
    # cluster's CPUs, and none more than three quarters of the largest node, so that a quarter CPU
    # stays free next to them for the (light) decode tasks; reserving everything starves decoding
    # and the pool waits for inputs forever (seen on 2 cores, and on two 1-CPU nodes)
    biggest = max([float(nd["Resources"].get("CPU", 0)) for nd in ray.nodes() if nd.get("Alive")] or [cpus])
    share = max(0.25, min(DECODE_CPU * 3 * cpus / actors, DECODE_CPU * 3 * biggest))
    threads = max(1, round(cpus / actors))  # torch threads: the cores, shared by the actors
    rows = [{"i": int(i), "path": str(paths[i])} for i in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * cpus)))
    ds = ds.map_batches(decode_batch, batch_size=batch_size, num_cpus=DECODE_CPU,
                        fn_kwargs={"root": str(Path(root).resolve()), "pre": backbone.preprocessing.to_dict(),
                                   "max_pixels": max_pixels, "rgb_bands": list(rgb_bands) if rgb_bands else None})
    ds = ds.map_batches(Embedder, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=share,
                        fn_constructor_kwargs={"backbone": backbone, "optimize": optimize, "batch_size": batch_size,
                                               "threads": threads, "n_images": -(-len(todo) // actors)})
    from landlens.features.store import ChunkAssembler

    startup = None
    chunks = ChunkAssembler(store, n, chunk_size, backbone.num_features)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc=f"extract {backbone.name} (ray, {actors} actors)",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if startup is None:
                startup = time.perf_counter() - t0
            fresh = 0
            for i, ok, reason, f in zip(batch["i"], batch["ok"], batch["reason"], batch["f"]):
                i = int(i)
                if not ok and strict:
                    raise ImageReadError(Path(root) / paths[i], str(reason))
                failure = None if ok else {"path": paths[i], "reason": str(reason)}
                fresh += chunks.add(i, f if ok else None, failure)  # a row delivered twice counts once
            if bar is not None:
                bar.update(fresh)
    finally:
        if bar is not None:
            bar.close()
    if chunks.open:
        missing = sorted(chunks.open)
        raise LandlensError(f"the Ray run ended with chunk(s) {missing[:5]} incomplete; run the command again "
                            f"to resume them")
    return float(startup or 0.0)


__all__ = ["DECODE_CPU", "FAULT_ENV", "Embedder", "connect", "decode_batch", "ray_module", "run_ray"]
