"""Reproducible, stratified dataset splits (hold-out and k-fold) and their JSON manifests.

A split is computed from a list of relative image paths, their integer labels and the class
names; it never reads images. The same inputs and seed give the same split on any machine,
whatever the order the paths were listed in, and adding or removing a class leaves the split of
every other class unchanged.

Determinism rules (shared by :func:`make_split` and :func:`make_kfold`):

* each class's paths are sorted, then permuted by ``numpy.random.Generator(PCG64(s))`` where
  ``s`` is the integer value of ``sha256(f"{seed}:{class_name}")``; the class index and the other
  classes play no part;
* each part of a manifest lists its ``(path, label)`` pairs sorted by path.

Hold-out counts per class (:func:`allocate_counts`), for a class of ``n`` images and part
ratios ``r_1..r_m`` (exact rationals, summing to 1):

1. every part gets ``floor(n * r_i)`` images;
2. the ``n - sum(floors)`` images left over go one each to the parts with the largest fractional
   remainders ``n * r_i - floor(n * r_i)``; ties go to the earlier part (train, val, test);
3. if ``n >= m``, every part that still has no image takes one from the part with the most
   images (ties: the earlier part), so each part holds at least one image of every class that
   has at least as many images as there are parts. A class with fewer images than parts fills
   the parts in the order of steps 1-2 and leaves some empty.

K-fold: each class's permuted paths are dealt round-robin into ``k`` folds starting at a fold
drawn from the same per-class generator, so fold sizes differ by at most one within a class and
the larger folds are not always the first ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Union

import numpy as np

from landlens.atomic import atomic_write_json
from landlens import __version__
from landlens.errors import DatasetError

__all__ = [
    "RATIO_PRESETS",
    "SplitManifest",
    "allocate_counts",
    "make_kfold",
    "make_split",
    "parse_ratios",
    "source_digest",
]

#: Ratio strings known to work (any other valid ratios are accepted too).
RATIO_PRESETS: tuple[str, ...] = (
    "80/20",
    "70/30",
    "60/40",
    "50/50",
    "40/60",
    "30/70",
    "20/80",
    "10/90",
    "70/10/20",
    "70/20/10",
    "60/20/20",
    "80/10/10",
)

FORMAT = "landlens-split"
FORMAT_VERSION = 1
PART_NAMES: tuple[str, ...] = ("train", "val", "test")

RatiosLike = Union[str, Sequence[float], Mapping[str, float]]
Part = tuple[list[str], np.ndarray]

_SUM_TOLERANCE = Fraction(1, 10**6)
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------
# ratios


def _to_fraction(value: object, original: object) -> Fraction:
    """One ratio value as an exact positive rational."""
    try:
        if isinstance(value, str):
            text = value.strip().rstrip("%").strip()
            frac = Fraction(text)
        elif isinstance(value, bool):
            raise ValueError
        elif isinstance(value, (int, np.integer)):
            frac = Fraction(int(value))
        else:
            frac = Fraction(repr(float(value)))  # type: ignore[arg-type]
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        raise DatasetError(f"invalid ratios {original!r}: {value!r} is not a number") from None
    if frac <= 0:
        raise DatasetError(f"invalid ratios {original!r}: every part must be > 0, got {value!r}")
    return frac


def _parse_ratios_exact(ratios: RatiosLike) -> dict[str, Fraction]:
    """Ratios as exact rationals summing to 1, keyed by part name in train/val/test order."""
    original = ratios
    named: dict[str, object] | None = None
    values: list[object]
    if isinstance(ratios, str):
        text = ratios.strip()
        if not text:
            raise DatasetError(f"invalid ratios {original!r}: empty")
        if "=" in text:
            named = {}
            for item in text.split(","):
                name, sep, value = item.partition("=")
                name = name.strip()
                if not sep or not name:
                    raise DatasetError(
                        f"invalid ratios {original!r}: expected name=value pairs, got {item.strip()!r}"
                    )
                if name in named:
                    raise DatasetError(f"invalid ratios {original!r}: part {name!r} given twice")
                named[name] = value
        else:
            values = [v for v in re.split(r"[/,:]", text)]
    elif isinstance(ratios, Mapping):
        named = dict(ratios)
    elif isinstance(ratios, Sequence) or isinstance(ratios, np.ndarray):
        values = list(ratios)
    else:
        raise DatasetError(f"invalid ratios {original!r}: expected a string, a list or a dict")

    if named is not None:
        unknown = [n for n in named if n not in PART_NAMES]
        if unknown:
            raise DatasetError(
                f"invalid ratios {original!r}: unknown part {unknown[0]!r} (use train, val, test)"
            )
        if "train" not in named:
            raise DatasetError(f"invalid ratios {original!r}: a 'train' part is required")
        names = [n for n in PART_NAMES if n in named]
        values = [named[n] for n in names]
    else:
        names = []
    if len(values) not in (2, 3):
        raise DatasetError(
            f"invalid ratios {original!r}: need 2 parts (train/test) or 3 (train/val/test), "
            f"got {len(values)}"
        )
    if not names:
        names = ["train", "test"] if len(values) == 2 else list(PART_NAMES)
    fracs = [_to_fraction(v, original) for v in values]
    total = sum(fracs, Fraction(0))
    if abs(total - 1) <= _SUM_TOLERANCE or abs(total - 100) <= 100 * _SUM_TOLERANCE:
        return {n: f / total for n, f in zip(names, fracs)}
    raise DatasetError(
        f"invalid ratios {original!r}: parts sum to {float(total):g}, expected 1 or 100"
    )


def parse_ratios(ratios: RatiosLike) -> dict[str, float]:
    """Parse split ratios into ``{part: fraction}`` (fractions sum to 1).

    Accepts ``"80/20"``, ``"70/10/20"``, ``"0.7,0.1,0.2"``, ``"train=0.7,val=0.1,test=0.2"``,
    a sequence such as ``[0.8, 0.2]`` or ``[70, 10, 20]``, or a ``{part: value}`` dict. Two
    unnamed parts are train/test, three are train/val/test; values must be positive and sum to
    1 or 100. Raises :class:`DatasetError` naming the bad value otherwise.
    """
    return {name: float(frac) for name, frac in _parse_ratios_exact(ratios).items()}


def allocate_counts(n: int, ratios: RatiosLike) -> dict[str, int]:
    """Images per part for one class of ``n`` images (largest-remainder rule, see module doc)."""
    return dict(zip(*_allocate(n, _parse_ratios_exact(ratios))))


def _allocate(n: int, fracs: Mapping[str, Fraction]) -> tuple[list[str], list[int]]:
    names = list(fracs)
    quotas = [n * fracs[name] for name in names]
    counts = [q.numerator // q.denominator for q in quotas]
    left = n - sum(counts)
    by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    if n >= len(names):
        for i in range(len(names)):
            if counts[i] == 0:
                donor = max(range(len(names)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] = 1
    return names, counts


# --------------------------------------------------------------------------------------------
# helpers


def source_digest(paths: Sequence[str], labels: Sequence[int] | np.ndarray) -> str:
    """SHA-256 (hex) of the sorted ``(path, label)`` list: identifies a dataset's contents."""
    pairs = sorted((str(p), int(label)) for p, label in zip(paths, labels))
    blob = json.dumps(pairs, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{class_name}".encode("utf-8")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _group_by_class(
    paths: Sequence[str], labels: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> list[list[str]]:
    """Sorted paths of each class, validating the inputs."""
    paths = [str(p) for p in paths]
    labels = [int(label) for label in np.asarray(labels).reshape(-1)]
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"duplicate class names in {list(classes)!r}")
    seen: set[str] = set()
    dupes = []
    for p in paths:
        if p in seen:
            dupes.append(p)
        seen.add(p)
    if dupes:
        raise DatasetError(f"duplicate paths in dataset: {_listing(dupes)}")
    groups: list[list[str]] = [[] for _ in classes]
    for p, label in zip(paths, labels):
        if not 0 <= label < len(classes):
            raise DatasetError(f"{p}: label {label} is out of range for {len(classes)} classes")
        groups[label].append(p)
    for group in groups:
        group.sort()
    return groups


# --------------------------------------------------------------------------------------------
# manifest


@dataclass
class SplitManifest:
    """A saved split of one dataset: which image goes to which part, and how it was made.

    ``parts`` maps a part name (``train``/``val``/``test``, or ``fold0``..``fold{k-1}``) to its
    ``(relative path, label)`` pairs sorted by path; labels index ``classes``.
    ``source_digest`` identifies the whole dataset the split was made from (see
    :func:`source_digest`), so applying the manifest to another folder is detected.
    """

    parts: dict[str, list[tuple[str, int]]]
    classes: list[str]
    ratios: dict[str, float]
    seed: int
    kind: Literal["holdout", "kfold"]
    dataset: str | None = None
    source_digest: str = ""
    created_with: str = field(default=__version__)

    def __post_init__(self) -> None:
        if not self.source_digest:
            self.source_digest = self._items_digest()

    # -- views ------------------------------------------------------------------------------

    def _items_digest(self) -> str:
        items = [item for part in self.parts.values() for item in part]
        return source_digest([p for p, _ in items], [label for _, label in items])

    @property
    def part_names(self) -> list[str]:
        """The part names in order."""
        return list(self.parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def part(self, name: str) -> Part:
        """``(paths, labels)`` of one part, labels as an int64 array."""
        if name not in self.parts:
            raise DatasetError(
                f"split has no part {name!r} (it has {', '.join(self.parts) or 'none'})"
            )
        items = self.parts[name]
        return [p for p, _ in items], np.array([label for _, label in items], dtype=np.int64)

    def indices(self, part: str, paths: Sequence[str]) -> np.ndarray:
        """Positions in ``paths`` (the dataset's order) of the images of ``part``, in part order."""
        position = {str(p): i for i, p in enumerate(paths)}
        part_paths, _ = self.part(part)
        missing = [p for p in part_paths if p not in position]
        if missing:
            raise DatasetError(
                f"{len(missing)} file(s) of split part {part!r} are not in the dataset: "
                f"{_listing(missing)}"
            )
        return np.array([position[p] for p in part_paths], dtype=np.int64)

    def check_against(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str] | None = None,
        *,
        allow_extra: bool = False,
    ) -> None:
        """Raise :class:`DatasetError` unless the dataset still matches this split.

        A mismatch is: a class list that differs (when ``classes`` is given), a file of the
        split missing from ``paths``, a file whose label changed, or (unless ``allow_extra``) a
        file in ``paths`` that belongs to no part.
        """
        if classes is not None and list(classes) != self.classes:
            raise DatasetError(
                f"dataset classes {list(classes)!r} differ from the split's {self.classes!r}"
            )
        label_list = [int(label) for label in np.asarray(labels).reshape(-1)]
        if len(label_list) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(label_list)} labels")
        current = {str(p): label for p, label in zip(paths, label_list)}
        if len(current) == len(self) and source_digest(list(current), list(current.values())) == (
            self.source_digest
        ):
            return
        missing: list[str] = []
        changed: list[str] = []
        known: set[str] = set()
        for items in self.parts.values():
            for p, label in items:
                known.add(p)
                if p not in current:
                    missing.append(p)
                elif current[p] != label:
                    changed.append(f"{p} ({self._class_name(label)} -> {self._class_name(current[p])})")
        if missing:
            raise DatasetError(
                f"{len(missing)} file(s) of the split are missing from the dataset: {_listing(missing)}"
            )
        if changed:
            raise DatasetError(
                f"{len(changed)} file(s) changed label since the split was made: {_listing(changed)}"
            )
        extra = sorted(p for p in current if p not in known)
        if extra and not allow_extra:
            raise DatasetError(
                f"{len(extra)} file(s) in the dataset belong to no part of the split: {_listing(extra)}"
            )

    def _class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else f"label {label}"

    def summary(self) -> dict[str, dict[str, int]]:
        """Image counts ``{part: {class: count}}``, every class listed in every part."""
        out: dict[str, dict[str, int]] = {}
        for name, items in self.parts.items():
            counts = dict.fromkeys(self.classes, 0)
            for _, label in items:
                counts[self.classes[label]] += 1
            out[name] = counts
        return out

    def format_summary(self) -> str:
        """The per-class, per-part counts as a plain-text table with totals."""
        summary = self.summary()
        parts = list(summary)
        header = ["class", *parts, "total"]
        rows = [
            [c, *(str(summary[p][c]) for p in parts), str(sum(summary[p][c] for p in parts))]
            for c in self.classes
        ]
        rows.append(
            ["total", *(str(len(self.parts[p])) for p in parts), str(len(self))]
        )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

        return "\n".join([line(header), *(line(r) for r in rows)])

    def folds(self, k: int | None = None) -> list[tuple[Part, Part]]:
        """For a k-fold split, ``[(train, test), ...]``: fold ``i`` is the test part of round ``i``."""
        if self.kind != "kfold":
            raise DatasetError(f"split is {self.kind!r}, not k-fold: it has no folds")
        names = list(self.parts)
        if k is not None and k != len(names):
            raise DatasetError(f"split has {len(names)} folds, not {k}")
        rounds: list[tuple[Part, Part]] = []
        for name in names:
            train = sorted(item for other in names if other != name for item in self.parts[other])
            train_part = ([p for p, _ in train], np.array([lb for _, lb in train], dtype=np.int64))
            rounds.append((train_part, self.part(name)))
        return rounds

    # -- files ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """The manifest as JSON-ready data (the file format written by :meth:`save`)."""
        parts: dict[str, dict[str, list[str]]] = {}
        for name, items in self.parts.items():
            by_class: dict[str, list[str]] = {}
            for p, label in sorted(items):
                by_class.setdefault(self.classes[label], []).append(p)
            parts[name] = {c: by_class[c] for c in self.classes if c in by_class}
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "dataset": self.dataset,
            "seed": self.seed,
            "ratios": self.ratios,
            "classes": self.classes,
            "source_digest": self.source_digest,
            "created_with": self.created_with,
            "sizes": {name: len(items) for name, items in self.parts.items()},
            "parts": parts,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the manifest as JSON (atomically) and return its path."""
        path = Path(path)
        atomic_write_json(path, self.to_dict(), indent=2, sort_keys=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SplitManifest:
        """Read a manifest written by :meth:`save`; :class:`DatasetError` if missing or invalid."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DatasetError(f"split manifest not found: {path}") from None
        except IsADirectoryError:
            raise DatasetError(f"split manifest is a directory, not a file: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read split manifest {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}), not a split manifest"
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "split manifest") -> SplitManifest:
        """Build a manifest from :meth:`to_dict` data, validating it."""

        def bad(why: str) -> DatasetError:
            return DatasetError(f"{source}: invalid split manifest: {why}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"'format' is not {FORMAT!r}")
        if data.get("version") != FORMAT_VERSION:
            raise bad(
                f"unsupported version {data.get('version')!r} (this landlens reads {FORMAT_VERSION})"
            )
        for key in ("kind", "seed", "ratios", "classes", "source_digest", "parts"):
            if key not in data:
                raise bad(f"missing key {key!r}")
        kind = data["kind"]
        if kind not in ("holdout", "kfold"):
            raise bad(f"'kind' must be 'holdout' or 'kfold', got {kind!r}")
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise bad("'classes' must be a list of names")
        if len(set(classes)) != len(classes):
            raise bad("'classes' has duplicate names")
        seed = data["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise bad(f"'seed' must be an integer, got {seed!r}")
        ratios = data["ratios"]
        if not isinstance(ratios, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in ratios.values()
        ):
            raise bad("'ratios' must map part names to numbers")
        raw_parts = data["parts"]
        if not isinstance(raw_parts, dict) or not raw_parts:
            raise bad("'parts' must map part names to {class: [paths]}")
        label_of = {c: i for i, c in enumerate(classes)}
        parts: dict[str, list[tuple[str, int]]] = {}
        seen: set[str] = set()
        for name, by_class in raw_parts.items():
            if not isinstance(by_class, dict):
                raise bad(f"part {name!r} must map class names to lists of paths")
            items: list[tuple[str, int]] = []
            for cls_name, plist in by_class.items():
                if cls_name not in label_of:
                    raise bad(f"part {name!r} lists unknown class {cls_name!r}")
                if not isinstance(plist, list) or not all(isinstance(p, str) for p in plist):
                    raise bad(f"part {name!r}, class {cls_name!r}: expected a list of paths")
                for p in plist:
                    if p in seen:
                        raise bad(f"{p} appears in more than one place")
                    seen.add(p)
                    items.append((p, label_of[cls_name]))
            parts[name] = sorted(items)
        digest = data["source_digest"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise bad("'source_digest' must be a sha256 hex digest")
        sizes = data.get("sizes")
        if sizes is not None and sizes != {name: len(items) for name, items in parts.items()}:
            raise bad("'sizes' do not match the file lists (edited by hand?)")
        manifest = cls(
            parts=parts,
            classes=list(classes),
            ratios={str(k): float(v) for k, v in ratios.items()},
            seed=seed,
            kind=kind,
            dataset=data.get("dataset"),
            source_digest=digest,
            created_with=str(data.get("created_with", "unknown")),
        )
        if manifest.source_digest != manifest._items_digest():
            raise bad("its file lists do not match its source_digest (edited by hand?)")
        return manifest


# --------------------------------------------------------------------------------------------
# making splits


def make_split(
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    *,
    ratios: RatiosLike = "80/20",
    seed: int = 0,
    dataset: str | None = None,
) -> SplitManifest:
    """Stratified hold-out split (train/test or train/val/test) of a labelled image list.

    ``labels[i]`` indexes ``classes`` and belongs to ``paths[i]`` (relative POSIX paths).
    Counts per class follow the largest-remainder rule and the shuffle follows the
    determinism rules of this module's docstring.
    """
    fracs = _parse_ratios_exact(ratios)
    groups = _group_by_class(paths, labels, classes)
    parts: dict[str, list[tuple[str, int]]] = {name: [] for name in fracs}
    for label, (class_name, group) in enumerate(zip(classes, groups)):
        if not group:
            continue
        order = _class_rng(seed, class_name).permutation(len(group))
        names, counts = _allocate(len(group), fracs)
        start = 0
        for name, count in zip(names, counts):
            parts[name].extend((group[i], label) for i in order[start : start + count])
            start += count
    for items in parts.values():
        items.sort()
    return SplitManifest(
        parts=parts,
        classes=list(classes),
        ratios={name: float(f) for name, f in fracs.items()},
        seed=int(seed),
        kind="holdout",
        dataset=dataset,
        source_digest=source_digest(paths, labels),
    )


def make_kfold(
    paths: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    *,
    k: int = 5,
    seed: int = 0,
    dataset: str | None = None,
) -> SplitManifest:
    """Stratified k-fold split: parts ``fold0``..``fold{k-1}``, each class split into k nearly equal folds.

    Within a class fold sizes differ by at most one; a class with fewer than ``k`` images is
    absent from some folds.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise DatasetError(f"k-fold needs k >= 2 folds, got {k!r}")
    k = int(k)
    groups = _group_by_class(paths, labels, classes)
    total = sum(len(g) for g in groups)
    if total < k:
        raise DatasetError(f"cannot make {k} folds from {total} image(s)")
    parts: dict[str, list[tuple[str, int]]] = {f"fold{i}": [] for i in range(k)}
    folds = list(parts.values())
    for label, (class_name, group) in enumerate(zip(classes, groups)):
        if not group:
            continue
        rng = _class_rng(seed, class_name)
        order = rng.permutation(len(group))
        offset = int(rng.integers(k))
        for j, i in enumerate(order):
            folds[(offset + j) % k].append((group[i], label))
    for items in folds:
        items.sort()
    return SplitManifest(
        parts=parts,
        classes=list(classes),
        ratios={name: 1.0 / k for name in parts},
        seed=int(seed),
        kind="kfold",
        dataset=dataset,
        source_digest=source_digest(paths, labels),
    )
