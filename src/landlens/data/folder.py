"""A folder of images with one sub-folder per class, scanned into a labelled file list.

:func:`scan_folder` turns a path into an :class:`ImageFolderDataset`: the class root, the
sorted class names, every image's path relative to the class root and its integer label.
It accepts either the class root itself or a dataset root that contains the catalog
entry's ``subdir`` (``UCMerced_LandUse`` resolves to ``UCMerced_LandUse/Images``).

Ordering is deterministic on every platform: classes in ``sorted()`` order (the order of
``torchvision.datasets.ImageFolder``, so labels agree), files by class and then in natural
order of their path within the class folder (``x_2.jpg`` before ``x_10.jpg``).
Hidden files and folders (names starting with ``.``) are skipped; files whose extension
is not in :data:`~landlens.data.io.IMAGE_EXTENSIONS` are skipped and listed in
:attr:`ImageFolderDataset.ignored`. Images in nested folders inside a class folder belong
to that class.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from landlens.data.catalog import CATALOG, DatasetSpec, get_spec, match_spec
from landlens.data.io import is_image_file
from landlens.errors import DatasetError



__all__ = ["ImageFolderDataset", "natural_key", "resolve_class_root", "scan_files",
    "scan_folder"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key ordering embedded numbers by value: ``a2`` < ``a10`` < ``b1``.

    Numbers sort before text at the same position (``10`` < ``x1``). Equal keys
    (``a01`` and ``a1``) are left to the caller to break on the raw text.
    """
    parts = _DIGITS.split(text)
    return tuple((0, int(p)) if i % 2 else (1, p) for i, p in enumerate(parts) if p != "")


@dataclass
class ImageFolderDataset:
    """Image files labelled by the class folder they sit in.

    Attributes:
        root: the class root (the folder whose sub-folders are the classes).
        classes: class names in label order (``sorted()``).
        paths: image paths relative to ``root``, POSIX style, sorted by class then
            natural file order.
        labels: ``int64`` label of each path (index into ``classes``).
        spec: the catalog entry this folder is, or ``None`` for an arbitrary folder.
        name: the catalog name, or the folder's name.
        ignored: files skipped because their extension is not an image extension
            (relative POSIX paths); hidden files are not listed.
        empty_classes: class folders that hold no image (not in ``classes``).
    """

    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    spec: DatasetSpec | None = None
    name: str = ""
    ignored: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError("paths and labels must have the same length")
        if not self.name:
            self.name = self.spec.name if self.spec is not None else self.root.name

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(name={self.name!r}, root={str(self.root)!r}, "
            f"classes={len(self.classes)}, images={len(self.paths)})"
        )

    def class_counts(self) -> dict[str, int]:
        """Number of images per class, in label order (classes with none give 0)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def absolute_path(self, i: int) -> Path:
        """The full path of image ``i``."""
        return self.root / self.paths[i]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFolderDataset:
        """A dataset with only the images at ``indices`` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for {len(self)} images")
        return ImageFolderDataset(
            root=self.root,
            classes=list(self.classes),
            paths=[self.paths[i] for i in idx.tolist()],
            labels=self.labels[idx].copy(),
            spec=self.spec,
            name=self.name,
            ignored=list(self.ignored),
            empty_classes=list(self.empty_classes),
        )


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _has_class_folders(path: Path) -> bool:
    """Whether some visible sub-folder of ``path`` holds an image file directly."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    for entry in entries:
        if not (_visible(entry.name) and entry.is_dir()):
            continue
        try:
            with os.scandir(entry.path) as inner:
                if any(_visible(f.name) and is_image_file(f.name) and f.is_file() for f in inner):
                    return True
        except OSError:
            continue
    return False


def _layouts(path: Path, spec: DatasetSpec) -> Iterable[Path]:
    """Where the class root of ``spec`` would be if ``path`` were its dataset root or the
    folder the archive was extracted into."""
    for sub in (spec.subdir, *spec.alt_subdirs):
        if sub:
            yield path / sub
            if spec.root_dir:
                yield path / spec.root_dir / sub
    if spec.root_dir and not spec.subdir:
        yield path / spec.root_dir


def _candidates(path: Path, spec: DatasetSpec | None) -> Iterable[Path]:
    if spec is not None:
        # The catalog layout first, then the folder itself.
        yield from _layouts(path, spec)
        yield path
        return
    # No dataset named: the folder itself, then any catalog layout inside it.
    yield path
    for other in CATALOG.values():
        yield from _layouts(path, other)


def resolve_class_root(path: str | os.PathLike[str], spec: DatasetSpec | None = None) -> Path:
    """The class root for ``path``: ``path`` itself or the catalog sub-folder inside it.

    Raises:
        DatasetError: ``path`` is missing, not a folder, or no candidate folder has class
            sub-folders with images.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such folder")
    if not p.is_dir():
        raise DatasetError(f"{p}: not a folder (expected a folder with one sub-folder per class)")
    seen: set[Path] = set()
    for cand in _candidates(p, spec):
        if cand in seen:
            continue
        seen.add(cand)
        if cand.is_dir() and _has_class_folders(cand):
            return cand
    hint = f" or {p / spec.subdir}" if spec is not None and spec.subdir else ""
    raise DatasetError(
        f"{p}: no class sub-folders with images found (expected {p}/<class>/<image>{hint})"
    )


def _scan_class(class_dir: Path, cls: str) -> tuple[list[str], list[str]]:
    """Image and non-image files under one class folder, relative to the class root."""
    images: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        rel_dir = Path(dirpath).relative_to(class_dir).as_posix()
        prefix = cls if rel_dir == "." else f"{cls}/{rel_dir}"
        for fname in filenames:
            if not _visible(fname):
                continue
            (images if is_image_file(fname) else others).append(f"{prefix}/{fname}")
    key = lambda rel: (natural_key(rel), rel)  # noqa: E731
    return sorted(images, key=key), sorted(others, key=key)


def scan_folder(path: str | os.PathLike[str], dataset: str | None = None) -> ImageFolderDataset:
    """Scan a class-per-folder image collection into an :class:`ImageFolderDataset`.

    Args:
        path: the class root, or a dataset root containing the catalog ``subdir``.
        dataset: catalog name or alias. Without it, ``path`` itself is tried first, then the
            catalog layouts inside it, and the catalog entry whose classes are exactly the
            folders found (if any) is attached as :attr:`ImageFolderDataset.spec`.

    Raises:
        DatasetError: unknown dataset name, missing path, not a folder, or no class
            sub-folders with images.
    """
    spec = get_spec(dataset) if dataset is not None else None
    root = resolve_class_root(path, spec)
    classes: list[str] = []
    empty: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    ignored: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not _visible(entry.name):
            continue
        if not entry.is_dir():
            if entry.is_file():
                ignored.append(entry.name)  # loose files next to the class folders
            continue
        images, others = _scan_class(Path(entry.path), entry.name)
        ignored.extend(others)
        if not images:
            empty.append(entry.name)
            continue
        labels.extend([len(classes)] * len(images))
        classes.append(entry.name)
        paths.extend(images)
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders with images found")
    if spec is None:
        suffixes = {os.path.splitext(p)[1].lower() for p in paths[:50]}
        spec = match_spec(classes, suffixes.pop() if len(suffixes) == 1 else None)
    return ImageFolderDataset(
        root=root,
        classes=classes,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        spec=spec,
        name=spec.name if spec is not None else Path(path).expanduser().name,
        ignored=ignored,
        empty_classes=empty,
    )


def scan_files(files: Sequence[str | os.PathLike[str]], name: str = "images") -> ImageFolderDataset:
    """A list of image files as an :class:`ImageFolderDataset`: the root is their common
    folder and each file's class is the name of the folder it sits in.

    Raises:
        DatasetError: no files, or a file that does not exist.
    """
    paths = [Path(f).expanduser().resolve() for f in files]
    if not paths:
        raise DatasetError("no image files given")
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{p}: no such file")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    if all(p.parent == root for p in paths) and root.parent != root:
        root = root.parent  # every file in one folder: that folder is their class
    classes = sorted({p.parent.name for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    return ImageFolderDataset(root=root, classes=classes, paths=[p.relative_to(root).as_posix() for p in paths],
                              labels=np.asarray([index[p.parent.name] for p in paths], dtype=np.int64), name=name)
