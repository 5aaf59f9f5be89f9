"""Train and evaluate the residual-dyad matching method: autoencoder, features, discriminator, retrieval.

Paper: N. Khurshid, Mohbat, M. Taj, F. Z. Qureshi, "A Residual-Dyad Encoder Discriminator
Network for Remote Sensing Image Matching". Images are described by the ``8 x 8 x n`` latent
maps of an autoencoder trained without labels (mean squared reconstruction error), first on a
large unlabelled corpus and then on the target dataset; a discriminator trained on labelled
pairs of such maps (2-way cross-entropy, a pair matches when both images share a class)
decides whether two images show the same scene class, and retrieval ranks the archive by the
match probability. Optimisation follows the paper: SGD from a learning rate of 0.001, the rate
multiplied by 0.2 on a plateau of the validation loss, early stopping after 10 epochs without
improvement (:mod:`landlens.matching.config`).

The steps, each a run directory of :mod:`landlens.training.runs`, laid out like a
classification run::

    config.json            the resolved config (a resume must match it)
    checkpoints/last.ckpt  resume point (loaded with weights_only)
    checkpoints/best.ckpt  best epoch by the validation loss
    history.csv/.json      per-epoch loss (and pair accuracy), learning rate and time
    learning_curves.png
    results.json           command, versions, data, model, timings and metrics

- :func:`pretrain_ae`: every image file under ``data.path`` (searched recursively, labels
  ignored), a random ``data.val_fraction`` held out for the validation loss. Writes
  ``images.json`` (the images used), ``autoencoder.safetensors`` + ``autoencoder.json`` (no
  pickle), ``reconstructions.png`` (validation originals over their reconstructions) and
  ``latent_maps.png`` (one image and the most active of its latent maps).
- :func:`finetune_ae`: the same on the *train* part of the target dataset only (the split of
  ``data.split`` / ``data.seed``, saved as ``split.json``), starting from a pre-trained run.
- :func:`~landlens.matching.files.encode_dataset`: latent maps of every image, flattened to rows of ``n * 64`` values
  (not normalised), extracted once into the feature cache by
  :func:`~landlens.features.extract.extract_features` through an encoder wrapped as a
  :class:`~landlens.models.registry.Backbone`, so caching, resume and the store's identity
  (the autoencoder's weights digest) are those of every other feature.
- :func:`train_dml`: the discriminator on pairs of the train part only
  (:class:`~landlens.matching.data.PairSampler`: a fresh, seeded, balanced sample every
  epoch); validation pairs take their first image from a held-out slice of the train part
  (the split's ``val`` part when it has one) and their second from the whole train part, never from the test part. Works on any features: latent
  maps ``(C, 8, 8)`` or vectors ``(D,)`` seen as ``(D, 1, 1)``. Writes ``split.json``,
  ``discriminator.safetensors`` + ``discriminator.json`` (with the identity of the features,
  which later evaluations must match) and the pair accuracy on validation and test pairs.
- :func:`evaluate_matching`: retrieval of the test part with the ``learned`` distance through
  :func:`landlens.retrieval.evaluate.evaluate` (mAP, ANMRR, P@k, class-wise mAP), next to a
  baseline distance (Euclidean) on the same features.

This module runs the steps; the images and pairs they read are :mod:`landlens.matching.data`'s,
the Lightning tasks :mod:`landlens.matching.tasks`'s, the autoencoder files and features
:mod:`landlens.matching.files`'s.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landlens.data.splits import SplitManifest
from landlens.errors import CheckpointError, ConfigError, DatasetError
from landlens.atomic import atomic_write_json
from landlens.features.store import FeatureSet
from landlens.matching.config import MatchingConfig, load_matching_run_config
from landlens.matching.data import (
    AEImageData,
    AEImages,
    PairSampler,
    holdout,
    list_images,
    prepare_pairs,
)
from landlens.matching.files import (
    IMAGES_FILE,
    SPLIT_FILE,
    ae_preprocessing,
    encode_dataset,
    feature_identity,
    feature_shape,
    load_autoencoder,
    read_autoencoder_meta,
    save_autoencoder,
)
from landlens.matching.networks import AEConfig, DMLConfig, MatchingDiscriminator, ResidualAutoencoder
from landlens.matching.tasks import AETask, DMLTask, pair_scores
from landlens.models.preprocessing import Preprocessing, normalize_batch
from landlens.training.runs import (
    CONFIG_FILE,
    RESULTS_FILE,
    FitResult,
    RunDir,
    RunResult,
    environment,
    fit,
)

#: Validation images shown in ``reconstructions.png``.
RECONSTRUCTION_IMAGES = 8
#: Latent channels shown in ``latent_maps.png``.
LATENT_MAPS_SHOWN = 15


# ============================================================================ run directories and the fit

def _start_run(cfg: MatchingConfig, resume: bool) -> tuple[RunDir, RunResult | None]:
    """Validate, check the run directory (a finished run is returned as is on resume), write config.json."""
    cfg.validate()
    run = RunDir(cfg.out)
    if resume and run.finished:
        run.check(cfg, resume=True)  # the same config, or a one-line refusal
        return run, RunResult(run.path, "complete", run.read_results())
    run = RunDir.start(cfg, resume=resume)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    return run, None


def _precision(cfg: MatchingConfig) -> str:
    p = str(cfg.trainer.precision)
    return "32-true" if p == "32" else p


def _fit(task: AETask | DMLTask, dm: L.LightningDataModule, cfg: MatchingConfig, run: RunDir, *, has_val: bool,
         resume: bool, callbacks: Sequence[L.Callback], progress: bool) -> FitResult:
    """:func:`landlens.training.runs.fit` with the matching config's trainer, plateau and early-stopping settings."""
    t = cfg.trainer
    return fit(task, dm, run, resume=resume, monitor=task.monitor, patience=cfg.optim.patience, validate=has_val,
               reload_best=True, callbacks=callbacks, progress=progress, max_epochs=cfg.optim.epochs,
               accelerator=t.accelerator, devices=t.devices, precision=_precision(cfg),
               log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False)


def _interrupted(run: RunDir, step: str) -> RunResult:
    return run.interrupted(f"landlens matching {step} {run.path / CONFIG_FILE} --resume")


def _learning_curves(run_dir: Path, history: list[dict[str, Any]], title: str) -> None:
    from landlens.reports.figures import plot_learning_curves

    if history:
        plot_learning_curves(history, run_dir / "learning_curves.png", title=title)


def _params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ============================================================================ autoencoder runs

def _to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """``(B, 3, H, W)`` in [0, 1] -> HWC uint8 arrays."""
    return list((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


@torch.inference_mode()
def _ae_figures(ae: ResidualAutoencoder, root: Path, paths: list[str], pre: Preprocessing,
                rgb_bands: Sequence[int] | None, run_dir: Path) -> dict[str, Any]:
    """``reconstructions.png`` and ``latent_maps.png`` of the first readable images of ``paths``."""
    from landlens.reports.figures import save_image_grid

    ds = AEImages(root, paths[: 4 * RECONSTRUCTION_IMAGES], pre, rgb_bands=rgb_bands)
    items = [ds[i] for i in range(len(ds))]
    items = [it for it in items if it[0] is not None][:RECONSTRUCTION_IMAGES]
    if not items:
        return {}
    x = normalize_batch(torch.from_numpy(np.stack([a for a, _, _ in items])), pre).contiguous()
    recon, z = ae(x)
    n = len(items)
    cell = int(min(128, max(64, pre.input_size)))
    names = [Path(p).stem for _, p, _ in items]
    save_image_grid(_to_uint8(x) + _to_uint8(recon), run_dir / "reconstructions.png", ncols=n,
                    titles=names + ["recon"] * n, cell_px=cell)
    maps = z[0].float()
    order = torch.argsort(maps.flatten(1).std(dim=1), descending=True, stable=True)[:LATENT_MAPS_SHOWN].tolist()
    tiles = [_to_uint8(x[:1])[0]]
    for c in order:
        m = maps[c]
        lo, hi = float(m.min()), float(m.max())
        scaled = 255 * (m - lo).cpu().numpy() / (hi - lo) if hi > lo else np.zeros(tuple(m.shape))
        tiles.append(np.rint(scaled).astype(np.uint8))
    save_image_grid(tiles, run_dir / "latent_maps.png", ncols=min(8, len(tiles)),
                    titles=[names[0]] + [f"map {c}" for c in order], cell_px=cell)
    return {"reconstructions": [p for _, p, _ in items], "latent_maps_of": items[0][1], "latent_maps_channels": order}


@torch.inference_mode()
def _ae_loss(ae: ResidualAutoencoder, dm: AEImageData, paths: list[str]) -> float | None:
    """Mean squared error of the reconstructions of ``paths`` (every pixel and channel equally weighted)."""
    if not paths:
        return None
    loader = dm.loader(paths, False)
    total, count = 0.0, 0
    for x, _ in loader:
        if x is None:
            continue
        recon, _ = ae(x)
        total += float(F.mse_loss(recon.float(), x, reduction="sum"))
        count += x.numel()
    return total / count if count else None


def _check_init(cfg: MatchingConfig, init: str | os.PathLike[str]) -> tuple[ResidualAutoencoder, dict[str, Any]]:
    meta = read_autoencoder_meta(init)
    saved = AEConfig.from_dict(meta["config"]).to_dict()
    mine = cfg.ae_config().to_dict()
    differ = [k for k in mine if mine[k] != saved[k]]
    if differ:
        keys = {"input_size": "data.input_size"}
        detail = ", ".join(f"{keys.get(k, 'ae.' + k)}={mine[k]!r} but the autoencoder at {init} has {saved[k]!r}"
                           for k in differ)
        raise ConfigError(f"cannot start from {init}: {detail}")
    return load_autoencoder(init), meta


def _train_autoencoder(cfg: MatchingConfig, mode: str, init: str | os.PathLike[str] | None, *, resume: bool,
                       callbacks: Sequence[L.Callback], progress: bool, command: str | None) -> RunResult:
    if init is not None:
        cfg.ae.init = str(init)
    if mode == "finetune" and not cfg.ae.init:
        raise ConfigError("fine-tuning needs the pre-trained autoencoder: give init= (ae.init=RUN_DIR)")
    if not cfg.data.path:
        raise ConfigError("data.path is not set: give the image folder (data.path=FOLDER)")
    run, done = _start_run(cfg, resume)
    if done is not None:
        return done
    run_dir = run.path
    t_start = time.perf_counter()
    d = cfg.data
    pre = ae_preprocessing(d.input_size, d.resize_mode)
    rgb_bands = None
    data_info: dict[str, Any]
    if mode == "pretrain":
        root, paths = list_images(d.path)
        fit_idx, val_idx = holdout(len(paths), d.val_fraction, d.seed)
        train_paths, val_paths = [paths[i] for i in fit_idx], [paths[i] for i in val_idx]
        data_info = {"root": str(root), "images": len(paths), "labels": "ignored (unlabelled)"}
    else:
        from landlens.training.config import DataConfig
        from landlens.training.datamodule import prepare_data

        prepared = prepare_data(DataConfig(path=d.path, dataset=d.dataset, split=d.split, seed=d.seed),
                                split_out=run_dir / SPLIT_FILE)
        ds = prepared.dataset
        root = Path(ds.root)
        rgb_bands = getattr(ds.spec, "rgb_bands", None) if ds.spec is not None else None
        train_rows = np.asarray(prepared.parts["train"], dtype=np.int64)
        if "val" in prepared.parts:
            fit_rows, val_rows = np.sort(train_rows), np.sort(np.asarray(prepared.parts["val"], dtype=np.int64))
        else:
            keep, held = holdout(len(train_rows), d.val_fraction, d.seed)
            fit_rows, val_rows = np.sort(train_rows[keep]), np.sort(train_rows[held])
        train_paths = [ds.paths[int(i)] for i in fit_rows]
        val_paths = [ds.paths[int(i)] for i in val_rows]
        data_info = {**prepared.summary(), "used_parts": ["train"] + (["val"] if "val" in prepared.parts else [])}
    data_info.update({"train_images": len(train_paths), "val_images": len(val_paths)})
    atomic_write_json(run_dir / IMAGES_FILE, {"root": str(root), "train": train_paths, "val": val_paths})

    ae = ResidualAutoencoder(cfg.ae_config())
    init_info = None
    if cfg.ae.init:
        start, meta = _check_init(cfg, cfg.ae.init)
        ae.load_state_dict(start.state_dict())
        init_info = {"run": str(cfg.ae.init), "weights_digest": meta["weights_digest"]}
    has_val = bool(val_paths)
    task = AETask(ae, cfg, "val_loss" if has_val else "train_loss")
    dm = AEImageData(root, train_paths, val_paths, pre, rgb_bands, d.batch_size, d.num_workers, cfg.trainer.seed)
    step = "pretrain-ae" if mode == "pretrain" else "finetune-ae"
    fitted = _fit(task, dm, cfg, run, has_val=has_val, resume=resume, callbacks=callbacks, progress=progress)
    if fitted.interrupted:
        return _interrupted(run, step)

    unreadable = dict(task.unreadable)
    t_eval = time.perf_counter()
    val_mse = _ae_loss(ae, dm, val_paths)
    train_mse = _ae_loss(ae, dm, train_paths)
    extra = {"step": step, "init": init_info, "data": {"root": str(root), "train_images": len(train_paths)}}
    save_autoencoder(ae, run_dir, pre, extra=extra)
    figures = _ae_figures(ae, root, val_paths or train_paths, pre, rgb_bands, run_dir)
    _learning_curves(run_dir, fitted.history, f"{step}: reconstruction MSE")
    results = {
        "command": command or " ".join(sys.argv),
        "step": step,
        "environment": environment(),
        "config": cfg.to_dict(),
        "data": data_info,
        "unreadable": {"count": len(unreadable), "first": dict(list(sorted(unreadable.items()))[:20])},
        "model": {**ae.config.to_dict(), "parameters": _params(ae), "latent_shape": list(ae.config.latent_shape),
                  "weights_digest": read_autoencoder_meta(run_dir)["weights_digest"]},
        "init": init_info,
        "epochs_run": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "val_mse": val_mse,
        "train_mse": train_mse,
        "figures": figures,
        "timing_s": {"fit": round(fitted.seconds, 2), "evaluate": round(time.perf_counter() - t_eval, 2),
                     "total": round(time.perf_counter() - t_start, 2)},
    }
    return run.complete(results)


def pretrain_ae(cfg: MatchingConfig, *, resume: bool = False, callbacks: Sequence[L.Callback] = (),
                progress: bool = True, command: str | None = None) -> RunResult:
    """Pre-train the autoencoder on every image under ``cfg.data.path`` (labels ignored).

    A seeded random ``data.val_fraction`` of the images gives the validation loss (best
    checkpoint, plateau schedule, early stopping). See the module docstring for the files.
    ``ae.init`` (optional) starts from another autoencoder run.
    """
    return _train_autoencoder(cfg, "pretrain", None, resume=resume, callbacks=callbacks, progress=progress,
                              command=command)


def finetune_ae(cfg: MatchingConfig, init: str | os.PathLike[str] | None = None, *, resume: bool = False,
                callbacks: Sequence[L.Callback] = (), progress: bool = True, command: str | None = None) -> RunResult:
    """Fine-tune a pre-trained autoencoder (``init``, or ``cfg.ae.init``) on the *train* part of the target dataset.

    The split of ``data.split`` / ``data.seed`` is saved as ``split.json``; the validation
    loss uses the split's ``val`` part, or a seeded random ``data.val_fraction`` of the train
    part. The test part is never read. The architecture must be the initial run's.
    """
    return _train_autoencoder(cfg, "finetune", init, resume=resume, callbacks=callbacks, progress=progress,
                              command=command)


# ============================================================================ features of a config

def resolve_features(cfg: MatchingConfig, *, progress: bool = True, command: str | None = None
                     ) -> tuple[FeatureSet, dict[str, Any]]:
    """The features ``cfg.features`` names, for the images of ``cfg.data.path``, and where they came from.

    ``features.ae``: latent maps of that autoencoder run (:func:`encode_dataset`);
    ``features.backbone``: pooled features of that backbone with ``features.weights``.
    """
    f, d = cfg.features, cfg.data
    if not d.path:
        raise ConfigError("data.path is not set: give the image folder (data.path=FOLDER)")
    workers = d.num_workers
    if f.ae:
        fs = encode_dataset(f.ae, d.path, d.dataset, cache_dir=f.cache_dir, workers=workers, progress=progress,
                            command=command)
        return fs, {"ae_run": str(f.ae)}
    if f.backbone:
        from landlens.features.cache import cached_features

        fs = cached_features(d.path, d.dataset, f.backbone, f.weights, cache_dir=f.cache_dir, workers=workers,
                             progress=progress, command=command)
        return fs, {"backbone": f.backbone, "weights": f.weights}
    raise ConfigError("no features to train on: set features.ae=AE_RUN_DIR or features.backbone=NAME")


def _check_ae_leak(source: dict[str, Any], manifest: SplitManifest) -> None:
    """Refuse a split whose test images the autoencoder was fine-tuned on."""
    ae_run = source.get("ae_run")
    if not ae_run:
        return
    images = Path(ae_run) / IMAGES_FILE
    if not (Path(ae_run) / SPLIT_FILE).is_file() or not images.is_file():
        return  # pre-trained only: unlabelled images, no split to respect
    used = json.loads(images.read_text())
    seen = set(used.get("train", [])) | set(used.get("val", []))
    test_paths, _ = manifest.part("test")
    leaked = [p for p in test_paths if p in seen]
    if leaked:
        raise ConfigError(f"the autoencoder {ae_run} was fine-tuned on {len(leaked)} of this split's test images "
                          f"(e.g. {leaked[0]}); use its data.split and data.seed")


# ============================================================================ discriminator runs

def train_dml(cfg: MatchingConfig, features: FeatureSet | None = None, *, resume: bool = False,
              callbacks: Sequence[L.Callback] = (), progress: bool = True, command: str | None = None,
              shape: tuple[int, int, int] | None = None) -> RunResult:
    """Train the pair discriminator on ``features`` (default: those ``cfg.features`` names).

    Pairs come from the train part only (:func:`prepare_pairs`); the loss is the 2-way
    cross-entropy; SGD (or Adam) with ``ReduceLROnPlateau`` and early stopping on the
    validation loss. ``shape`` overrides the ``(C, H, W)`` of a feature row
    (:func:`feature_shape`). Writes ``split.json``, the discriminator (with the features'
    identity, :func:`feature_identity`) and ``results.json`` with the pair loss and accuracy
    on validation pairs and on balanced test pairs.
    """
    cfg.validate()
    if resume and RunDir(cfg.out).finished:
        return _start_run(cfg, resume)[1]  # type: ignore[return-value]
    if features is None:
        features, source = resolve_features(cfg, progress=progress, command=command)
    else:
        source = {"given": (features.meta or {}).get("identity", {}).get("backbone") or "feature set"}
    features = features.only_valid()
    c, h, w = shape or feature_shape(features)
    if c * h * w != features.features.shape[1] or h != w:
        raise ConfigError(f"feature shape {(c, h, w)} does not fit rows of {features.features.shape[1]} values")
    run, _ = _start_run(cfg, resume)
    run_dir = run.path
    t_start = time.perf_counter()
    pairs = prepare_pairs(cfg, features, split_out=run_dir / SPLIT_FILE)
    _check_ae_leak(source, pairs.manifest)

    net = MatchingDiscriminator(DMLConfig(kind=cfg.dml.kind, in_channels=c, spatial=h, width=cfg.dml.width))
    has_val = pairs.val_pairs is not None
    task = DMLTask(net, cfg, "val_loss" if has_val else "train_loss")
    fitted = _fit(task, pairs, cfg, run, has_val=has_val, resume=resume, callbacks=callbacks, progress=progress)
    if fitted.interrupted:
        return _interrupted(run, "train-dml")

    identity = feature_identity(features)
    if shape is not None:
        identity["shape"] = [c, h, w]
    extra = {"features": identity, "source": source, "split": SPLIT_FILE,
             "trained_on": {"train_images": int(len(pairs.fit_rows)), "val_images": int(len(pairs.val_rows))}}
    from landlens.matching.scoring import save_discriminator

    save_discriminator(net, run_dir, extra=extra)
    t_eval = time.perf_counter()
    val = pair_scores(net, pairs.features, pairs.val_pairs) if has_val else None
    test = None
    n_test = max(2, min(cfg.pairs.val_pairs, len(pairs.parts["test"]) * (len(pairs.parts["test"]) - 1)))
    try:
        test_pairs = PairSampler(pairs.labels, pairs.parts["test"], n_test, cfg.pairs.positive_fraction,
                                 cfg.pairs.seed + 2).sample(0)
        test = pair_scores(net, pairs.features, test_pairs)
    except DatasetError:
        test = None
    _learning_curves(run_dir, fitted.history, "discriminator: pair loss and accuracy")
    from landlens.retrieval.evaluate import describe_features

    results = {
        "command": command or " ".join(sys.argv),
        "step": "train-dml",
        "environment": environment(),
        "config": cfg.to_dict(),
        "data": {"classes": list(features.classes), "ratios": pairs.manifest.ratios, "seed": pairs.manifest.seed,
                 "parts": {k: int(len(v)) for k, v in pairs.parts.items()},
                 "fit_images": int(len(pairs.fit_rows)), "val_images": int(len(pairs.val_rows)),
                 "pairs_per_epoch": len(pairs.sampler), "val_pairs": 0 if pairs.val_pairs is None
                 else int(len(pairs.val_pairs[2]))},
        "features": {**describe_features(features), "identity": identity, "source": source},
        "model": {**net.config.to_dict(), "parameters": _params(net)},
        "epochs_run": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "val_pairs": val,
        "test_pairs": test,
        "timing_s": {"fit": round(fitted.seconds, 2), "evaluate": round(time.perf_counter() - t_eval, 2),
                     "total": round(time.perf_counter() - t_start, 2)},
    }
    return run.complete(results)


# ============================================================================ retrieval evaluation

@dataclass
class MatchingEvaluation:
    """Retrieval with the learned distance and with a baseline distance on the same features and protocol."""

    learned: Any  # EvaluationResult
    baseline: Any | None
    discriminator: str

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"discriminator": self.discriminator, "learned": self.learned.to_dict()}
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
            out["mAP_gain"] = float(self.learned.metrics["mAP"] - self.baseline.metrics["mAP"])
        return out

    def summary(self) -> str:
        """Two Markdown tables: the learned distance, then the baseline."""
        parts = [self.learned.to_markdown()]
        if self.baseline is not None:
            parts.append(self.baseline.to_markdown())
        return "\n\n".join(parts)


def evaluate_matching(dml_run: str | os.PathLike[str], features: FeatureSet,
                      split: str | os.PathLike[str] | SplitManifest | None = None, protocol: str = "split",
                      shortlist: int | None = None, *, database: str = "archive-minus-query",
                      baseline: str | None = "euclidean", batch_pairs: int | None = None) -> MatchingEvaluation:
    """Retrieval of the test part with the discriminator of ``dml_run`` and with ``baseline``.

    Ranks with ``get_distance("learned", model=dml_run, features=feature_identity(features))``
    (which refuses features other than those the discriminator was trained on) through
    :func:`landlens.retrieval.evaluate.evaluate`, so every retrieval metric comes out. With
    ``protocol='split'`` the test part of ``split`` (default: the run's ``split.json``)
    queries ``database``; ``protocol='archive'`` lets every image query the others.
    ``shortlist=k`` re-ranks only each query's ``k`` Euclidean neighbours.
    """
    from landlens.matching.scoring import DEFAULT_BATCH_PAIRS
    from landlens.retrieval.distances import get_distance
    from landlens.retrieval.evaluate import evaluate
    from landlens.retrieval.protocols import resolve_protocol

    features = features.only_valid()
    manifest = None
    if protocol == "split":
        if split is None:
            split = Path(dml_run) / SPLIT_FILE
            if not Path(split).is_file():
                raise CheckpointError(f"{dml_run} has no {SPLIT_FILE}; give the split to evaluate on")
        manifest = split if isinstance(split, SplitManifest) else SplitManifest.load(split)
    dist = get_distance("learned", model=dml_run, shortlist=shortlist, features=feature_identity(features),
                        batch_pairs=int(batch_pairs or DEFAULT_BATCH_PAIRS))
    p = resolve_protocol(features, protocol, manifest=manifest, database=database)
    learned = evaluate(features, distance=dist, protocol=p)
    base = evaluate(features, distance=baseline, protocol=p) if baseline else None
    return MatchingEvaluation(learned, base, str(dml_run))


def load_run(run_dir: str | os.PathLike[str]) -> tuple[MatchingConfig, dict[str, Any]]:
    """The config and results of a finished matching run."""
    cfg = load_matching_run_config(run_dir)
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not finished: {RESULTS_FILE} not found (resume it with --resume)")
    return cfg, json.loads(path.read_text())


__all__ = [
    "MatchingEvaluation",
    "evaluate_matching",
    "finetune_ae",
    "load_run",
    "pretrain_ae",
    "resolve_features",
    "train_dml",
]
