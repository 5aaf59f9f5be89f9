"""Checking a dataset folder before using it: every file decodes, counts match the catalog.

:func:`verify_dataset` scans a folder (:func:`~landlens.data.folder.scan_folder`), fully
decodes every image file with :func:`~landlens.data.io.read_image` in a pool of worker
processes, and compares the images found per class with the catalog entry, if the folder
is one. The :class:`VerifyReport` lists every problem: unreadable files with their reason
(empty, not an image, truncated, corrupt, too large), missing and unexpected classes and
per-class count mismatches. Files with non-image extensions, empty class folders and
images whose size differs from the catalog's nominal size are reported too, as notes:
they do not make the report fail (UC Merced, for one, ships 44 images that are not
256x256).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from landlens.data.folder import scan_folder
from landlens.data.io import DEFAULT_MAX_PIXELS, read_image
from landlens.errors import ImageReadError

__all__ = ["BadFile", "VerifyReport", "verify_dataset"]

_INLINE_BELOW = 256
"""Folders with fewer images are decoded in the calling process (no pool start-up)."""


@dataclass(frozen=True)
class BadFile:
    """An image file that cannot be decoded.

    Attributes:
        path: path relative to the class root, POSIX style.
        reason: why, e.g. ``"truncated image data"``.
    """

    path: str
    reason: str


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_dataset`.

    Attributes:
        root: the class root that was checked.
        dataset: catalog name the folder was compared with, or ``None``.
        classes: class folders that hold images, in label order.
        counts: image files found per class (readable or not).
        expected: the catalog's images per class, or ``None`` without a catalog entry.
        missing_classes: catalog classes with no images in the folder.
        unexpected_classes: classes in the folder the catalog does not have.
        count_mismatches: ``{class: (found, expected)}`` for the other classes.
        bad_files: every file that cannot be decoded, with the reason.
        non_image_files: files skipped for their extension (a note, not a failure).
        empty_classes: class folders without images (a failure only via
            ``missing_classes``).
        expected_size: the catalog's nominal ``(width, height)``, or ``None``.
        off_size: ``(path, width, height)`` of readable images of another size (a note).
        max_pixels: the size limit used.
        elapsed_s: wall time of the check in seconds.
        short_sides: the shorter side in pixels of every readable image (for :meth:`notes`).
    """

    root: str
    dataset: str | None
    classes: list[str]
    counts: dict[str, int]
    expected: dict[str, int] | None
    missing_classes: list[str] = field(default_factory=list)
    unexpected_classes: list[str] = field(default_factory=list)
    count_mismatches: dict[str, tuple[int, int]] = field(default_factory=dict)
    bad_files: list[BadFile] = field(default_factory=list)
    non_image_files: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    expected_size: tuple[int, int] | None = None
    off_size: list[tuple[str, int, int]] = field(default_factory=list)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    elapsed_s: float = 0.0
    short_sides: list[int] = field(default_factory=list, repr=False)

    @property
    def n_images(self) -> int:
        """Image files found."""
        return sum(self.counts.values())

    @property
    def n_readable(self) -> int:
        """Image files that decode."""
        return self.n_images - len(self.bad_files)

    @property
    def ok(self) -> bool:
        """True when every file decodes and the classes and counts match the catalog."""
        return not (
            self.bad_files or self.missing_classes or self.unexpected_classes
            or self.count_mismatches
        )  # fmt: skip

    def problems(self) -> list[str]:
        """One human-readable line per problem (empty when :attr:`ok`)."""
        lines = [f"missing class: {c}" for c in self.missing_classes]
        lines += [f"unexpected class: {c}" for c in self.unexpected_classes]
        lines += [
            f"count mismatch: {c}: {found} images, expected {exp}"
            for c, (found, exp) in self.count_mismatches.items()
        ]
        lines += [f"unreadable: {b.path}: {b.reason}" for b in self.bad_files]
        return lines

    def upsampled(self, input_size: int) -> int:
        """Readable images whose shorter side is below ``input_size``: a network of that input
        sees them enlarged, with no more detail than they hold."""
        return sum(1 for s in self.short_sides if s < input_size)

    def short_side_summary(self) -> dict[str, int] | None:
        """``{"min", "median", "max"}`` of the readable images' shorter sides (``None``: none readable)."""
        if not self.short_sides:
            return None
        sides = sorted(self.short_sides)
        return {"min": sides[0], "median": sides[len(sides) // 2], "max": sides[-1]}

    def notes(self, input_size: int | None = None) -> list[str]:
        """One line per note (never a failure): skipped files, empty class folders, images of
        another size than the catalog's, and with ``input_size`` the images a network of that
        input upsamples."""
        out = []
        if self.non_image_files:
            out.append(f"{len(self.non_image_files)} file(s) skipped (not an image extension)")
        if self.empty_classes:
            out.append(f"class folders without images: {', '.join(self.empty_classes)}")
        if self.off_size and self.expected_size is not None:
            out.append(f"{len(self.off_size)} image(s) are not {self.expected_size[0]}x{self.expected_size[1]}")
        n_up = self.upsampled(input_size) if input_size else 0
        if n_up:
            every = n_up == len(self.short_sides)
            share = "every image has" if every else f"{n_up} of {len(self.short_sides)} images have"
            out.append(f"{share} a shorter side below the backbone's {input_size}-px input "
                       f"(smallest {min(self.short_sides)} px) and {'is' if every else 'are'} upsampled: the network "
                       f"sees no more detail than the image holds")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values."""
        return {
            "ok": self.ok,
            "root": self.root,
            "dataset": self.dataset,
            "n_images": self.n_images,
            "n_readable": self.n_readable,
            "classes": list(self.classes),
            "counts": dict(self.counts),
            "expected": None if self.expected is None else dict(self.expected),
            "missing_classes": list(self.missing_classes),
            "unexpected_classes": list(self.unexpected_classes),
            "count_mismatches": {
                c: {"found": f, "expected": e} for c, (f, e) in self.count_mismatches.items()
            },
            "bad_files": [{"path": b.path, "reason": b.reason} for b in self.bad_files],
            "non_image_files": list(self.non_image_files),
            "empty_classes": list(self.empty_classes),
            "expected_size": None if self.expected_size is None else list(self.expected_size),
            "off_size": [{"path": p, "width": w, "height": h} for p, w, h in self.off_size],
            "max_pixels": self.max_pixels,
            "elapsed_s": round(self.elapsed_s, 3),
            "short_side": self.short_side_summary(),
        }


def _check_one(path: str, max_pixels: int | None) -> tuple[str | None, int, int]:
    """Decode one file completely: ``(None, width, height)`` or ``(reason, 0, 0)``."""
    try:
        arr = read_image(path, max_pixels=max_pixels)
    except ImageReadError as exc:
        return exc.reason, 0, 0
    except Exception as exc:  # a decoder bug on one file must not abort a long check
        return f"unexpected decoder error ({type(exc).__name__}: {exc})", 0, 0
    return None, int(arr.shape[1]), int(arr.shape[0])


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver/spawn: safe even when the caller has threads (torch, a web server).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has the decoders imported already.
        ctx.set_forkserver_preload(["landlens.data.verify"])
        return ctx
    return multiprocessing.get_context("spawn")


def _check_all(
    files: Sequence[str], max_pixels: int | None, workers: int, progress: bool
) -> Iterator[tuple[str | None, int, int]]:
    if workers <= 1 or len(files) < _INLINE_BELOW:
        results: Iterator[tuple[str | None, int, int]] = map(_check_one, files, repeat(max_pixels))
        yield from _with_progress(results, len(files), progress)
        return
    chunksize = max(1, min(64, len(files) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        results = pool.map(_check_one, files, repeat(max_pixels), chunksize=chunksize)
        yield from _with_progress(results, len(files), progress)


def _with_progress(
    it: Iterator[tuple[str | None, int, int]], total: int, progress: bool
) -> Iterator[tuple[str | None, int, int]]:
    if not progress:
        return it
    from tqdm import tqdm

    return iter(tqdm(it, total=total, desc="verify", unit="img"))


def verify_dataset(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Decode every image of a dataset folder and compare it with the catalog.

    Args:
        path: class root or dataset root (see :func:`~landlens.data.folder.scan_folder`).
        dataset: catalog name or alias; without it, a folder whose classes match a catalog
            entry exactly is compared with that entry.
        max_pixels: largest width x height accepted per image; ``None`` for no limit.
        workers: decoding processes (default: the number of CPUs); 1 decodes in-process.
        progress: show a progress bar on stderr.

    Raises:
        DatasetError: the folder cannot be scanned (missing, not a folder, no classes).
    """
    start = time.perf_counter()
    ds = scan_folder(path, dataset)
    spec = ds.spec
    n_workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    files = [str(ds.absolute_path(i)) for i in range(len(ds))]

    bad: list[BadFile] = []
    off_size: list[tuple[str, int, int]] = []
    short_sides: list[int] = []
    expected_size = spec.image_size if spec is not None else None
    for rel, (reason, w, h) in zip(
        ds.paths, _check_all(files, max_pixels, n_workers, progress), strict=True
    ):
        if reason is not None:
            bad.append(BadFile(rel, reason))
            continue
        short_sides.append(min(w, h))
        if expected_size is not None and (w, h) != tuple(expected_size):
            off_size.append((rel, w, h))

    counts = ds.class_counts()
    report = VerifyReport(
        root=str(ds.root),
        dataset=spec.name if spec is not None else None,
        classes=list(ds.classes),
        counts=counts,
        expected=dict(spec.images_per_class) if spec is not None else None,
        bad_files=bad,
        non_image_files=list(ds.ignored),
        empty_classes=list(ds.empty_classes),
        expected_size=tuple(expected_size) if expected_size is not None else None,
        off_size=off_size,
        max_pixels=max_pixels,
        short_sides=short_sides,
    )
    if spec is not None:
        report.missing_classes = [c for c in spec.classes if c not in counts]
        report.unexpected_classes = [c for c in ds.classes if c not in spec.images_per_class]
        report.count_mismatches = {
            c: (counts[c], spec.images_per_class[c])
            for c in spec.classes
            if c in counts and counts[c] != spec.images_per_class[c]
        }
    report.elapsed_s = time.perf_counter() - start
    return report
