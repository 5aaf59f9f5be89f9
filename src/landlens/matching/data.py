"""The data of matching runs: image folders for the autoencoder, labelled pairs for the discriminator.

The autoencoder reads every image file under a folder (:func:`list_images`, labels ignored)
through :class:`AEImageData`, unreadable images skipped and listed. The discriminator learns
from pairs of feature rows of the train part of a split (:func:`prepare_pairs`): a fresh,
seeded, balanced :class:`PairSampler` sample every epoch, fixed validation pairs whose first
image is held out, never a test image (:class:`PairData`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from landlens.data.splits import SplitManifest, make_split
from landlens.errors import DatasetError
from landlens.features.extract import DecodeDataset
from landlens.features.store import FeatureSet
from landlens.matching.config import MatchingConfig
from landlens.models.preprocessing import Preprocessing, normalize_batch


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


class AEImages(DecodeDataset):
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


class AEImageData(L.LightningDataModule):
    """Images of the autoencoder's train and validation lists."""

    def __init__(self, root: Path, train: list[str], val: list[str], pre: Preprocessing,
                 rgb_bands: Sequence[int] | None, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.root, self.train, self.val, self.pre = root, train, val, pre
        self.rgb_bands = rgb_bands
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def loader(self, paths: list[str], train: bool) -> DataLoader:
        """Batches ``(images or None, [(path, reason) of unreadable ones])`` of ``paths``; shuffled by
        (seed, epoch) for training."""
        from landlens.training.datamodule import EpochShuffleSampler

        ds = AEImages(self.root, paths, self.pre, rgb_bands=self.rgb_bands)
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(ds), self.seed) if train
                          else None, drop_last=train and len(ds) > self.batch_size, num_workers=self.num_workers,
                          collate_fn=_ImageCollate(self.pre), persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train, True)

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.val, False) if self.val else []


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


__all__ = [
    "AEImageData",
    "AEImages",
    "PairData",
    "PairFeatures",
    "PairSampler",
    "holdout",
    "list_images",
    "prepare_pairs",
]
