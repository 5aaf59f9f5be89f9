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

The steps, each a run directory laid out like a classification run
(:mod:`landlens.training.engine`)::

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
- :func:`encode_dataset`: latent maps of every image, flattened to rows of ``n * 64`` values
  (not normalised), extracted once into the feature cache by
  :func:`~landlens.features.extract.extract_features` through an encoder wrapped as a
  :class:`~landlens.models.registry.Backbone`, so caching, resume and the store's identity
  (the autoencoder's weights digest) are those of every other feature.
- :func:`train_dml`: the discriminator on pairs of the train part only (:class:`PairSampler`:
  a fresh, seeded, balanced sample every epoch); validation pairs take their first image from
  a held-out slice of the train part (the split's ``val`` part when it has one) and their
  second from the whole train part, never from the test part. Works on any features: latent
  maps ``(C, 8, 8)`` or vectors ``(D,)`` seen as ``(D, 1, 1)``. Writes ``split.json``,
  ``discriminator.safetensors`` + ``discriminator.json`` (with the identity of the features,
  which later evaluations must match) and the pair accuracy on validation and test pairs.
- :func:`evaluate_matching`: retrieval of the test part with the ``learned`` distance through
  :func:`landlens.retrieval.evaluate.evaluate` (mAP, ANMRR, P@k, class-wise mAP), next to a
  baseline distance (Euclidean) on the same features.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from landlens.data.splits import SplitManifest, make_split
from landlens.errors import CheckpointError, ConfigError, DatasetError, LandlensError, first_line
from landlens.features.extract import DecodeDataset
from landlens.features.store import FeatureSet, atomic_write_json
from landlens.matching.config import MatchingConfig, load_matching_run_config
from landlens.matching.networks import (
    LATENT_SIZE,
    AEConfig,
    DMLConfig,
    MatchingDiscriminator,
    ResidualAutoencoder,
    reconstruction_loss,
)
from landlens.models.preprocessing import Preprocessing, normalize_batch
from landlens.models.registry import Backbone, BackboneSpec, WeightsInfo
from landlens.training.runs import (
    CONFIG_FILE,
    RESULTS_FILE,
    FitResult,
    RNGStateCheckpoint,
    RunDir,
    RunResult,
    environment,
    fit,
)

AE_FORMAT = "landlens-matching-autoencoder"
AE_FORMAT_VERSION = 1
AE_WEIGHTS = "autoencoder.safetensors"
AE_META = "autoencoder.json"
#: Backbone family of wrapped encoders: a feature store with this family holds latent maps.
AE_FAMILY = "landlens-matching"
IMAGES_FILE = "images.json"
SPLIT_FILE = "split.json"
#: Validation images shown in ``reconstructions.png``.
RECONSTRUCTION_IMAGES = 8
#: Latent channels shown in ``latent_maps.png``.
LATENT_MAPS_SHOWN = 15


# ============================================================================ autoencoder files

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
    meta = features.meta or {}
    ident = meta.get("identity") or {}
    out: dict[str, Any] = {}
    fusion = meta.get("fusion")
    if fusion:
        out["fusion"] = fusion
    for key in ("backbone", "weights_digest", "preprocessing"):
        if ident.get(key) is not None:
            out[key] = ident[key]
    out["dim"] = int(features.features.shape[1])
    out["shape"] = list(feature_shape(features))
    return out


# ============================================================================ images for the autoencoder

def list_images(path: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    """Every image file under ``path`` (recursively; hidden files and folders skipped), as paths
    relative to ``path`` in natural order.

    Raises:
        DatasetError: ``path`` is not a folder or holds no image file.
    """
    from landlens.data.folder import natural_key
    from landlens.data.io import is_image_file

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a linked folder seen before (or a link cycle)
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / f).as_posix() for f in filenames if not f.startswith(".") and is_image_file(f))
    if not found:
        raise DatasetError(f"{root}: no image files found (searched recursively)")
    return root, sorted(found, key=lambda p: (natural_key(p), p))


class _Images(DecodeDataset):
    """Decoded, resized images as uint8 arrays; a failure comes back as ``(None, path, reason)``."""

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str, str | None]:  # type: ignore[override]
        arr, _, reason = super().__getitem__(i)
        return arr, self.paths[i], reason


class _ImageCollate:
    """Stack the readable images of a batch, normalised once (:func:`normalize_batch`); list the others."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(self, batch: list[tuple[np.ndarray | None, str, str | None]]
                 ) -> tuple[torch.Tensor | None, list[tuple[str, str]]]:
        ok = [a for a, _, _ in batch if a is not None]
        bad = [(p, str(r)) for a, p, r in batch if a is None]
        x = normalize_batch(torch.from_numpy(np.stack(ok)), self.pre).contiguous() if ok else None
        return x, bad


class _ImageData(L.LightningDataModule):
    """Images of the autoencoder's train and validation lists."""

    def __init__(self, root: Path, train: list[str], val: list[str], pre: Preprocessing,
                 rgb_bands: Sequence[int] | None, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.root, self.train, self.val, self.pre = root, train, val, pre
        self.rgb_bands = rgb_bands
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _loader(self, paths: list[str], train: bool) -> DataLoader:
        from landlens.training.datamodule import EpochShuffleSampler

        ds = _Images(self.root, paths, self.pre, rgb_bands=self.rgb_bands)
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(ds), self.seed) if train
                          else None, drop_last=train and len(ds) > self.batch_size, num_workers=self.num_workers,
                          collate_fn=_ImageCollate(self.pre), persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, False) if self.val else []


def _holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random ``fraction`` of ``range(n)`` (at least one item when ``fraction > 0`` and
    ``n >= 2``) and the rest, both sorted."""
    k = int(round(fraction * n))
    if fraction > 0 and k == 0 and n >= 2:
        k = 1
    k = min(k, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _stratified_holdout(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded random ``fraction`` of ``rows`` held out (one item at least for classes of
    three or more, none for smaller ones); returns ``(kept, held_out)``, both sorted."""
    kept, held = [], []
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        k = int(round(fraction * len(members)))
        if fraction > 0 and k == 0 and len(members) >= 3:
            k = 1
        k = min(k, len(members) - 1)
        perm = rng.permutation(members)
        held.append(perm[:k])
        kept.append(perm[k:])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)

    return cat(kept), cat(held)


# ============================================================================ Lightning tasks


class _MatchingTask(RNGStateCheckpoint, L.LightningModule):
    """Optimiser (SGD or Adam), ``ReduceLROnPlateau`` on the monitored loss, RNG state in checkpoints."""

    def __init__(self, net: nn.Module, cfg: MatchingConfig, monitor: str) -> None:
        super().__init__()
        self.net = net
        self.optim_cfg = cfg.optim
        self.monitor = monitor

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        o = self.optim_cfg
        params = [p for p in self.net.parameters() if p.requires_grad]
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.plateau_factor,
                                                           patience=o.plateau_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "interval": "epoch",
                                                   "strict": False}}


class AETask(_MatchingTask):
    """Autoencoder training: mean squared reconstruction error; unreadable images are skipped and listed."""

    def __init__(self, ae: ResidualAutoencoder, cfg: MatchingConfig, monitor: str) -> None:
        super().__init__(ae, cfg, monitor)
        self.unreadable: dict[str, str] = {}

    def _step(self, batch: tuple[torch.Tensor | None, list[tuple[str, str]]], stage: str) -> torch.Tensor | None:
        x, bad = batch
        for path, reason in bad:
            self.unreadable[str(path)] = str(reason)
        if x is None:
            return None
        recon, _ = self.net(x)
        loss = reconstruction_loss(recon.float(), x)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")


class DMLTask(_MatchingTask):
    """Discriminator training: 2-way cross-entropy on (first, second, match) batches; pair accuracy."""

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        a, b, y = batch
        logits = self.net(a, b).float()
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")


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


def _fit(task: _MatchingTask, dm: L.LightningDataModule, cfg: MatchingConfig, run: RunDir, *, has_val: bool,
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

    ds = _Images(root, paths[: 4 * RECONSTRUCTION_IMAGES], pre, rgb_bands=rgb_bands)
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
def _ae_loss(ae: ResidualAutoencoder, dm: _ImageData, paths: list[str]) -> float | None:
    """Mean squared error of the reconstructions of ``paths`` (every pixel and channel equally weighted)."""
    if not paths:
        return None
    loader = dm._loader(paths, False)
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
        fit_idx, val_idx = _holdout(len(paths), d.val_fraction, d.seed)
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
            keep, held = _holdout(len(train_rows), d.val_fraction, d.seed)
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
    dm = _ImageData(root, train_paths, val_paths, pre, rgb_bands, d.batch_size, d.num_workers, cfg.trainer.seed)
    step = "pretrain-ae" if mode == "pretrain" else "finetune-ae"
    fit = _fit(task, dm, cfg, run, has_val=has_val, resume=resume, callbacks=callbacks, progress=progress)
    if fit.interrupted:
        return _interrupted(run, step)

    unreadable = dict(task.unreadable)
    t_eval = time.perf_counter()
    val_mse = _ae_loss(ae, dm, val_paths)
    train_mse = _ae_loss(ae, dm, train_paths)
    extra = {"step": step, "init": init_info, "data": {"root": str(root), "train_images": len(train_paths)}}
    save_autoencoder(ae, run_dir, pre, extra=extra)
    figures = _ae_figures(ae, root, val_paths or train_paths, pre, rgb_bands, run_dir)
    _learning_curves(run_dir, fit.history, f"{step}: reconstruction MSE")
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
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "val_mse": val_mse,
        "train_mse": train_mse,
        "figures": figures,
        "timing_s": {"fit": round(fit.seconds, 2), "evaluate": round(time.perf_counter() - t_eval, 2),
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


# ============================================================================ pairs

class PairSampler(Sampler[tuple[int, int, int]]):
    """A balanced random sample of labelled pairs, drawn afresh for every epoch.

    Each epoch yields ``per_epoch`` triples ``(first, second, match)`` of feature-row indices:
    ``round(per_epoch * positive_fraction)`` matching pairs (same class, two different images)
    and the rest non-matching (different classes), in random order and with the two images of
    each pair in random order. The first image is drawn from ``anchors`` and the second from
    ``partners`` (default: the anchors), so only those rows can ever appear. The sample
    depends only on ``(seed, epoch)``: Lightning calls :meth:`set_epoch` before each epoch,
    so a resumed run sees the pairs an uninterrupted one would.

    Raises:
        DatasetError: no two images of one class (no matching pair) or a single class (no
            non-matching pair).
    """

    def __init__(self, labels: np.ndarray, anchors: np.ndarray, per_epoch: int, positive_fraction: float = 0.5,
                 seed: int = 0, partners: np.ndarray | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.anchors = np.asarray(anchors, dtype=np.int64)
        self.partners = self.anchors if partners is None else np.asarray(partners, dtype=np.int64)
        self.per_epoch = int(per_epoch)
        self.n_pos = int(round(self.per_epoch * float(positive_fraction)))
        self.n_neg = self.per_epoch - self.n_pos
        self.seed = int(seed)
        self.epoch = 0
        plab = self.labels[self.partners]
        self._by_class = {int(c): self.partners[plab == c] for c in np.unique(plab)}
        alab = self.labels[self.anchors]
        # an anchor can match when its class has a partner other than itself
        self._pos_anchors = np.array([a for a, c in zip(self.anchors, alab)
                                      if np.count_nonzero(self._by_class.get(int(c), np.zeros(0)) != a) > 0],
                                     dtype=np.int64)
        self._neg_anchors = np.array([a for a, c in zip(self.anchors, alab) if np.any(plab != c)], dtype=np.int64)
        if self.n_pos and not len(self._pos_anchors):
            raise DatasetError(f"no two of these {len(self.anchors)} images share a class: no matching pair to draw")
        if self.n_neg and not len(self._neg_anchors):
            raise DatasetError(f"these {len(self.anchors)} images are of one class: no non-matching pair to draw")
        self._others: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_epoch

    def _other(self, c: int) -> np.ndarray:
        if c not in self._others:
            self._others[c] = self.partners[self.labels[self.partners] != c]
        return self._others[c]

    def sample(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(first, second, match)`` arrays of the pairs of ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, e, 0x5EED])
        first = np.empty(self.per_epoch, np.int64)
        second = np.empty(self.per_epoch, np.int64)
        if self.n_pos:
            anchors = rng.choice(self._pos_anchors, self.n_pos)
            for t, a in enumerate(anchors):
                same = self._by_class[int(self.labels[a])]
                same = same[same != a]
                first[t], second[t] = a, same[rng.integers(len(same))]
        if self.n_neg:
            anchors = rng.choice(self._neg_anchors, self.n_neg)
            for t, a in enumerate(anchors, start=self.n_pos):
                other = self._other(int(self.labels[a]))
                first[t], second[t] = a, other[rng.integers(len(other))]
        match = np.concatenate([np.ones(self.n_pos, np.int64), np.zeros(self.n_neg, np.int64)])
        swap = rng.random(self.per_epoch) < 0.5
        first[swap], second[swap] = second[swap], first[swap].copy()
        order = rng.permutation(self.per_epoch)
        return first[order], second[order], match[order]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        a, b, y = self.sample()
        return iter(zip(a.tolist(), b.tolist(), y.tolist()))


class _FixedPairs(Sampler[tuple[int, int, int]]):
    """The same pairs, in order, every epoch (validation)."""

    def __init__(self, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return int(len(self.pairs[2]))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        a, b, y = self.pairs
        return iter(zip(a.tolist(), b.tolist(), y.tolist()))


class PairFeatures(Dataset):
    """Feature rows of pairs: a batch of ``(first, second, match)`` indices -> ``(A, B, y)`` tensors."""

    def __init__(self, features: np.ndarray) -> None:
        self.features = features

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, pair: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        a, b, y = pair
        return (torch.from_numpy(np.asarray(self.features[a], dtype=np.float32)),
                torch.from_numpy(np.asarray(self.features[b], dtype=np.float32)), int(y))

    def __getitems__(self, pairs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray(pairs, dtype=np.int64).reshape(-1, 3)
        take = lambda rows: torch.from_numpy(np.ascontiguousarray(self.features[rows], dtype=np.float32))  # noqa: E731
        return take(idx[:, 0]), take(idx[:, 1]), torch.from_numpy(idx[:, 2].copy())


def _as_is(batch: Any) -> Any:
    return batch


class PairData(L.LightningDataModule):
    """Pairs for discriminator training, all drawn inside the train part of the split.

    Attributes:
        features: ``(N, D)`` rows; labels: their classes.
        parts: rows of each split part (``train``, ``test``, maybe ``val``) in ``features``.
        fit_rows: train rows the training pairs are drawn from.
        val_rows: held-out rows (the split's ``val`` part, or a slice of the train part) that
            are the first image of every validation pair.
        sampler: the :class:`PairSampler` of the training pairs.
        val_pairs: fixed validation pairs (``None`` without held-out rows).
        manifest: the split.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, parts: dict[str, np.ndarray], fit_rows: np.ndarray,
                 val_rows: np.ndarray, sampler: PairSampler,
                 val_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None, manifest: SplitManifest,
                 batch_size: int = 32) -> None:
        super().__init__()
        self.features, self.labels, self.parts = features, labels, parts
        self.fit_rows, self.val_rows = fit_rows, val_rows
        self.sampler, self.val_pairs, self.manifest = sampler, val_pairs, manifest
        self.batch_size = int(batch_size)

    def _loader(self, sampler: Sampler) -> DataLoader:
        return DataLoader(PairFeatures(self.features), batch_size=self.batch_size, sampler=sampler,
                          drop_last=False, collate_fn=_as_is, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data import BatchSampler

        n = len(self.sampler)
        return DataLoader(PairFeatures(self.features), batch_sampler=BatchSampler(
            self.sampler, self.batch_size, drop_last=n > self.batch_size), collate_fn=_as_is, num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(_FixedPairs(self.val_pairs)) if self.val_pairs is not None else []


def _resolve_split(cfg: MatchingConfig, features: FeatureSet) -> SplitManifest:
    """The split of ``cfg.data`` (folder scan and ``data.split``/``data.seed``, or a manifest file),
    made on the dataset folder when ``data.path`` is set, else on the feature set's own images."""
    d = cfg.data
    manifest_path = Path(d.split).expanduser()
    if d.path:
        from landlens.training.config import DataConfig
        from landlens.training.datamodule import prepare_data

        return prepare_data(DataConfig(path=d.path, dataset=d.dataset, split=d.split, seed=d.seed)).split
    if manifest_path.suffix == ".json" or manifest_path.is_file():
        split = SplitManifest.load(manifest_path)
    else:
        name = ((features.meta or {}).get("dataset") or {}).get("name")
        split = make_split(features.paths, features.labels, features.classes, ratios=d.split, seed=d.seed,
                           dataset=name)
    if split.kind != "holdout" or "train" not in split.parts or "test" not in split.parts:
        raise DatasetError(f"split {d.split!r} must be a hold-out split with train and test parts")
    return split


def _part_rows(features: FeatureSet, manifest: SplitManifest) -> dict[str, np.ndarray]:
    """Rows of each split part in ``features``; images missing from the features (unreadable) are left out."""
    if list(manifest.classes) != list(features.classes):
        raise DatasetError(f"the split's classes {manifest.classes[:5]} are not the features' {features.classes[:5]}")
    position = {str(p): i for i, p in enumerate(features.paths)}
    failed = {str(f.get("path")) for f in (features.meta or {}).get("failures", []) if isinstance(f, dict)}
    parts: dict[str, np.ndarray] = {}
    for name in manifest.part_names:
        paths, _ = manifest.part(name)
        unexplained = [p for p in paths if p not in position and p not in failed]
        if unexplained:
            raise DatasetError(f"{len(unexplained)} image(s) of split part {name!r} have no feature row: "
                               f"{unexplained[0]}; were the features extracted from another folder?")
        parts[name] = np.array([position[p] for p in paths if p in position], dtype=np.int64)
    return parts


def prepare_pairs(cfg: MatchingConfig, features: FeatureSet, *, split_out: str | Path | None = None) -> PairData:
    """Split the features' images and set up training and validation pairs inside the train part.

    Training pairs are drawn (:class:`PairSampler`) from ``fit_rows``: the train part less the
    held-out rows. Held-out rows are the split's ``val`` part when it has one, else a seeded
    stratified ``data.val_fraction`` of the train part; each validation pair joins a held-out
    image with another image of the train part (held-out or not). Test rows never appear.
    """
    manifest = _resolve_split(cfg, features)
    if split_out is not None:
        manifest.save(split_out)
    parts = _part_rows(features, manifest)
    labels = np.asarray(features.labels, dtype=np.int64)
    train = np.sort(parts["train"])
    if "val" in parts and len(parts["val"]):
        fit_rows, val_rows = train, np.sort(parts["val"])
    else:
        fit_rows, val_rows = _stratified_holdout(labels, train, cfg.data.val_fraction, cfg.data.seed)
    p = cfg.pairs
    sampler = PairSampler(labels, fit_rows, p.per_epoch, p.positive_fraction, p.seed)
    val_pairs = None
    n_val = min(p.val_pairs, len(val_rows) * (len(fit_rows) + len(val_rows) - 1))  # no more than distinct pairs
    if n_val >= 2:
        try:
            val_pairs = PairSampler(labels, val_rows, n_val, p.positive_fraction, p.seed + 1,
                                    partners=np.concatenate([fit_rows, val_rows])).sample(0)
        except DatasetError:
            val_pairs = None
    return PairData(np.asarray(features.features), labels, parts, fit_rows, val_rows, sampler, val_pairs, manifest,
                    cfg.data.batch_size)


@torch.inference_mode()
def pair_scores(model: MatchingDiscriminator, features: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                batch: int = 1024) -> dict[str, float]:
    """Cross-entropy and accuracy of ``model`` on labelled pairs (eval mode); ``{'loss', 'accuracy', 'pairs'}``."""
    model.eval()
    ds = PairFeatures(features)
    a, b, y = pairs
    total_loss, correct = 0.0, 0
    for s in range(0, len(y), batch):
        xa, xb, yy = ds.__getitems__(list(zip(a[s:s + batch], b[s:s + batch], y[s:s + batch])))
        logits = model(xa, xb).float()
        total_loss += float(F.cross_entropy(logits, yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
    n = int(len(y))
    return {"loss": total_loss / n if n else float("nan"), "accuracy": correct / n if n else float("nan"), "pairs": n}


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
    fit = _fit(task, pairs, cfg, run, has_val=has_val, resume=resume, callbacks=callbacks, progress=progress)
    if fit.interrupted:
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
    _learning_curves(run_dir, fit.history, "discriminator: pair loss and accuracy")
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
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "val_pairs": val,
        "test_pairs": test,
        "timing_s": {"fit": round(fit.seconds, 2), "evaluate": round(time.perf_counter() - t_eval, 2),
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


def run_kind(run_dir: str | os.PathLike[str]) -> str:
    """``'autoencoder'`` or ``'discriminator'``: what a matching run directory holds (``CheckpointError`` else)."""
    p = Path(run_dir)
    if (p / AE_META).is_file():
        return "autoencoder"
    if (p / "discriminator.json").is_file():
        return "discriminator"
    raise CheckpointError(f"{p} holds no trained autoencoder or discriminator")


def load_run(run_dir: str | os.PathLike[str]) -> tuple[MatchingConfig, dict[str, Any]]:
    """The config and results of a finished matching run."""
    cfg = load_matching_run_config(run_dir)
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not finished: {RESULTS_FILE} not found (resume it with --resume)")
    return cfg, json.loads(path.read_text())


__all__ = [
    "AETask",
    "AE_FAMILY",
    "DMLTask",
    "MatchingEvaluation",
    "PairData",
    "PairFeatures",
    "PairSampler",
    "ae_preprocessing",
    "autoencoder_backbone",
    "encode_dataset",
    "evaluate_matching",
    "feature_identity",
    "feature_shape",
    "finetune_ae",
    "list_images",
    "load_autoencoder",
    "load_run",
    "pair_scores",
    "prepare_pairs",
    "pretrain_ae",
    "read_autoencoder_meta",
    "resolve_features",
    "run_kind",
    "save_autoencoder",
    "train_dml",
]
