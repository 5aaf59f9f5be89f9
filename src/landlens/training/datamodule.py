"""Data for training: divide a folder into parts, decode and augment images, batch them.

:func:`prepare_data` runs the ``divide_dataset`` step (a seeded stratified split, or a saved
split manifest checked against the folder) and returns the parts' indices.
:class:`SceneDataModule` feeds decoded, augmented images; :class:`FeatureDataModule` feeds
cached frozen-backbone features instead (the fast path of the ``linear`` strategy without
augmentation). For metric learning both can draw class-balanced training batches
(:class:`ClassBalancedSampler`) and also serve the train part without augmentation (the
retrieval database of validation) and the whole split (the test evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from landlens.data.folder import ImageFolderDataset, scan_folder
from landlens.data.splits import SplitManifest, make_split
from landlens.errors import DatasetError, ImageReadError
from landlens.models.preprocessing import Preprocessing, decode_image
from landlens.training.config import DataConfig


@dataclass
class PreparedData:
    """A scanned dataset, its split, and the positions of each part in the dataset's order."""

    dataset: ImageFolderDataset
    split: SplitManifest
    parts: dict[str, np.ndarray]

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)

    @property
    def val_part(self) -> str | None:
        return "val" if "val" in self.parts else None

    def summary(self) -> dict[str, Any]:
        return {"root": str(self.dataset.root), "dataset": self.dataset.name, "classes": self.classes,
                "ratios": self.split.ratios, "seed": self.split.seed,
                "parts": {k: int(len(v)) for k, v in self.parts.items()}}


def prepare_data(cfg: DataConfig, *, split_out: str | Path | None = None) -> PreparedData:
    """Scan ``cfg.path``, divide it (or apply a manifest), optionally save the manifest.

    Raises:
        DatasetError: the folder cannot be scanned, the manifest does not match the folder,
            or the split has no ``train`` or ``test`` part.
    """
    ds = scan_folder(cfg.path, cfg.dataset)
    manifest_path = Path(cfg.split).expanduser()
    if manifest_path.suffix == ".json" or manifest_path.is_file():
        split = SplitManifest.load(manifest_path)
        split.check_against(ds.paths, ds.labels, ds.classes, allow_extra=True)
    else:
        split = make_split(ds.paths, ds.labels, ds.classes, ratios=cfg.split, seed=cfg.seed, dataset=ds.name)
    if split.kind != "holdout":
        raise DatasetError(f"split {cfg.split!r} is a {split.kind} split; training needs train/test parts")
    for needed in ("train", "test"):
        if needed not in split.parts:
            raise DatasetError(f"split {cfg.split!r} has no {needed!r} part (parts: {', '.join(split.parts)})")
    parts = {name: split.indices(name, ds.paths) for name in split.part_names}
    empty = [n for n, idx in parts.items() if len(idx) == 0]
    if empty:
        raise DatasetError(f"split {cfg.split!r} of {ds.root} leaves part(s) {', '.join(empty)} empty")
    if split_out is not None:
        split.save(split_out)
    return PreparedData(ds, split, parts)


def check_images(data: PreparedData, workers: int | None = None) -> None:
    """Decode every image of the split; raise one :class:`DatasetError` listing the bad files."""
    from landlens.data.verify import verify_dataset

    report = verify_dataset(data.dataset.root, data.dataset.name if data.dataset.spec else None, workers=workers)
    used = {data.dataset.paths[int(i)] for idx in data.parts.values() for i in idx}
    bad = [b for b in report.bad_files if str(b.path) in used]
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more; see 'landlens data verify {data.dataset.root}')" if len(bad) > 1 else ""
        raise DatasetError(f"cannot train: unreadable image {Path(data.dataset.root) / first.path}: "
                           f"{first.reason}{more}")


class EpochShuffleSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch).

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed at epoch k sees the
    same order as an uninterrupted one (a plain ``RandomSampler`` would restart its generator).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ClassBalancedSampler(Sampler[int]):
    """Batches of ``m`` images of each of ``batch_size / m`` classes, in an order that depends
    only on (seed, epoch).

    pytorch-metric-learning's ``MPerClassSampler`` (an epoch of about ``len(labels)`` images,
    a whole number of batches; a class with fewer than ``m`` images is sampled with
    replacement) driven by a NumPy generator seeded with (seed, epoch), so a resumed run draws
    the same batches as an uninterrupted one (the PML sampler alone uses NumPy's global state).

    Raises:
        ConfigError: ``batch_size`` not a multiple of ``m``, or more than ``m`` x the number of
            classes.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, m: int, batch_size: int, seed: int) -> None:
        from pytorch_metric_learning.samplers import MPerClassSampler

        from landlens.errors import ConfigError

        labels = np.asarray(labels, dtype=np.int64)
        n_classes = len(np.unique(labels))
        if batch_size % m:
            raise ConfigError(f"data.batch_size={batch_size} must be a multiple of data.samples_per_class={m}")
        if m * n_classes < batch_size:
            raise ConfigError(f"data.batch_size={batch_size} exceeds data.samples_per_class={m} x {n_classes} "
                              f"classes of the train part; use a batch size <= {m * n_classes}")
        n = len(labels)
        self._pml = MPerClassSampler(labels, m, batch_size=batch_size,
                                     length_before_new_iter=max(batch_size, n - n % batch_size))
        self._classes = list(self._pml.labels)
        self.m, self.batch_size, self.seed, self.epoch = int(m), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._pml)

    def __iter__(self):
        from pytorch_metric_learning.utils import common_functions as c_f

        self._pml.labels = list(self._classes)  # the PML sampler shuffles its class list in place
        saved = c_f.NUMPY_RANDOM
        c_f.NUMPY_RANDOM = np.random.RandomState([self.seed, self.epoch, 7])
        try:
            order = list(iter(self._pml))
        finally:
            c_f.NUMPY_RANDOM = saved
        return iter([int(i) for i in order])


def _train_sampler(labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int) -> Sampler[int]:
    if samples_per_class:
        return ClassBalancedSampler(labels, samples_per_class, batch_size, seed)
    return EpochShuffleSampler(len(labels), seed)


def split_rows(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Every dataset position that some part of the split uses, ascending (the split's archive)."""
    return np.unique(np.concatenate([np.asarray(v, dtype=np.int64) for v in parts.values()]))


class SceneImages(Dataset):
    """Decoded images of a dataset subset with a transform: item ``i`` -> ``(tensor, label)``."""

    def __init__(self, dataset: ImageFolderDataset, indices: np.ndarray, transform: Callable[[Any], torch.Tensor],
                 preprocessing: Preprocessing, labels: np.ndarray | None = None) -> None:
        self.files = [str(dataset.absolute_path(int(i))) for i in indices]
        self.preprocessing = preprocessing
        self.labels = (np.asarray(labels, dtype=np.int64) if labels is not None
                       else np.asarray(dataset.labels, dtype=np.int64)[np.asarray(indices, dtype=np.int64)])
        self.transform = transform
        spec = dataset.spec
        self.rgb_bands = getattr(spec, "rgb_bands", None) if spec is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            img = decode_image(self.files[i], self.preprocessing, rgb_bands=self.rgb_bands)
        except ImageReadError as exc:
            # a single-argument error survives the trip out of a DataLoader worker
            raise DatasetError(f"unreadable image {exc}") from None
        return self.transform(img), int(self.labels[i])


class SceneDataModule(L.LightningDataModule):
    """Images of the train / val / test parts, augmented for training only.

    :meth:`from_folder` builds one from a folder of class sub-folders in one line. Batches are
    ``(images, labels)``; the predict loader serves the test part.
    ``samples_per_class`` > 0 draws class-balanced training batches (:class:`ClassBalancedSampler`).
    """

    def __init__(self, data: PreparedData, train_transform: Callable, eval_transform: Callable, *,
                 preprocessing: Preprocessing, batch_size: int, eval_batch_size: int, num_workers: int, seed: int,
                 samples_per_class: int = 0) -> None:
        super().__init__()
        self.data = data
        self.preprocessing = preprocessing
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.samples_per_class = int(samples_per_class)

    @classmethod
    def from_folder(cls, path: str | Path, split: str = "80/20", *, preprocessing: Preprocessing | None = None,
                    backbone: str | None = None, dataset: str | None = None, seed: int = 0, augment: str = "none",
                    batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 2,
                    split_out: str | Path | None = None) -> "SceneDataModule":
        """The images of a folder of class sub-folders, divided by ``split``, as a network expects them.

        Args:
            path: the folder (or a catalog dataset's root, with ``dataset``).
            split: ratios (``80/20``, ``70/10/20``: train/test or train/val/test, seeded and
                stratified) or the path of a split manifest (``landlens data split``).
            preprocessing: what the network expects (input size, resizing, normalisation):
                ``task.preprocessing`` of a :class:`~landlens.training.task.ClassificationTask`.
            backbone: instead of ``preprocessing``, the registry's preprocessing of this
                backbone's default weights.
            dataset: catalog name (``landlens data list``) for layout and band handling.
            seed: seed of the split and of the training order.
            augment: training augmentation preset (``none``, ``crop-flip``, ``colour``,
                ``geometric``, ``dihedral``).
            batch_size, eval_batch_size: training and evaluation batch sizes (the latter
                defaults to the former).
            num_workers: image-decoding worker processes.
            split_out: also save the split manifest there.

        Raises:
            ConfigError: neither ``preprocessing`` nor ``backbone``, or an unknown ``augment``.
            DatasetError: the folder cannot be scanned, or the split leaves a part empty.
        """
        from landlens.training.augment import build_eval_transform, build_train_transform
        from landlens.errors import ConfigError

        if preprocessing is None:
            if backbone is None:
                raise ConfigError("give the network's preprocessing (preprocessing=task.preprocessing) or backbone=")
            from landlens.models.registry import default_preprocessing, get_spec

            preprocessing = default_preprocessing(get_spec(backbone))
        data = prepare_data(DataConfig(path=str(path), dataset=dataset, split=str(split), seed=int(seed)),
                            split_out=split_out)
        return cls(data, build_train_transform(augment, preprocessing), build_eval_transform(preprocessing),
                   preprocessing=preprocessing, batch_size=int(batch_size),
                   eval_batch_size=int(eval_batch_size or batch_size), num_workers=int(num_workers), seed=int(seed))

    @property
    def classes(self) -> list[str]:
        """The class names, in label order."""
        return self.data.classes

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def _loader(self, part: str, train: bool) -> DataLoader:
        return self._rows_loader(self.data.parts[part], train)

    def _rows_loader(self, rows: np.ndarray, train: bool) -> DataLoader:
        ds = SceneImages(self.data.dataset, rows, self.train_transform if train else self.eval_transform,
                         self.preprocessing)
        sampler = _train_sampler(ds.labels, self.batch_size, self.samples_per_class, self.seed) if train else None
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler,
                          drop_last=train and len(ds) > self.batch_size, num_workers=self.num_workers,
                          persistent_workers=False, generator=torch.Generator().manual_seed(self.seed),
                          pin_memory=torch.cuda.is_available())

    def database_dataloader(self) -> DataLoader:
        """The train part without augmentation, in order (the retrieval database of validation)."""
        return self._loader("train", False)

    def split_dataloader(self) -> tuple[np.ndarray, DataLoader]:
        """Every image of the split without augmentation, in dataset order, and their dataset positions."""
        rows = split_rows(self.data.parts)
        return rows, self._rows_loader(rows, False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False) if self.data.val_part else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        """The test part without augmentation, in order (``(images, labels)`` batches)."""
        return self._loader("test", False)


class FeatureDataModule(L.LightningDataModule):
    """Cached frozen-backbone features of the train / val / test parts.

    ``samples_per_class`` > 0 draws class-balanced training batches (:class:`ClassBalancedSampler`).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, parts: dict[str, np.ndarray], *,
                 batch_size: int, eval_batch_size: int, seed: int, samples_per_class: int = 0) -> None:
        super().__init__()
        self.x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.parts = parts
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.samples_per_class = int(samples_per_class)

    def _loader(self, part: str, train: bool) -> DataLoader:
        return self._rows_loader(np.asarray(self.parts[part], dtype=np.int64), train)

    def _rows_loader(self, rows: np.ndarray, train: bool) -> DataLoader:
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        ds = TensorDataset(self.x[idx], self.y[idx])
        sampler = (_train_sampler(self.y[idx].numpy(), self.batch_size, self.samples_per_class, self.seed)
                   if train else None)
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler,
                          drop_last=train and len(ds) > self.batch_size,
                          generator=torch.Generator().manual_seed(self.seed))

    def database_dataloader(self) -> DataLoader:
        """The train part in order (the retrieval database of validation)."""
        return self._loader("train", False)

    def split_dataloader(self) -> tuple[np.ndarray, DataLoader]:
        """Every row of the split, in dataset order, and their dataset positions."""
        rows = split_rows(self.parts)
        return rows, self._rows_loader(rows, False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False) if "val" in self.parts else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def feature_rows(store_paths: Sequence[str], dataset_paths: Sequence[str]) -> np.ndarray:
    """Row of each dataset image in a feature store (stores drop unreadable images)."""
    pos = {p: i for i, p in enumerate(store_paths)}
    missing = [p for p in dataset_paths if p not in pos]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) have no cached feature (unreadable?): {missing[0]}")
    return np.array([pos[p] for p in dataset_paths], dtype=np.int64)


__all__ = [
    "ClassBalancedSampler",
    "EpochShuffleSampler",
    "FeatureDataModule",
    "PreparedData",
    "SceneDataModule",
    "SceneImages",
    "check_images",
    "feature_rows",
    "prepare_data",
    "split_rows",
]
