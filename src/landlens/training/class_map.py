"""Match a test dataset's classes to a model's classes, for in-dataset and cross-dataset evaluation.

Cross-dataset evaluation trains on one dataset and tests on the classes another dataset shares
with it (e.g. a UC Merced model on the AID classes that UC Merced also has). The test images are
relabelled with the *model's* class indices:

* with no class map, classes whose names are equal after :func:`normalize_class_name`
  (case-insensitive, ignoring ``_``, ``-`` and spaces: ``denseResidential`` = ``dense_residential``)
  are matched; the other test classes are dropped;
* with a class map, exactly the test classes it maps to a model class are kept. Several test
  classes may map to one model class (``sparse_residential`` and ``medium_residential`` to
  ``residential``); a test class mapped to ``null`` or an empty value is dropped, and so is a
  test class the map does not mention.

Class map files are JSON objects ``{"test_class": "train_class", ...}`` or two-column CSV/TSV
files (``test_class,train_class``; the header is optional; blank lines and ``#`` comments are
skipped; a line with one field or an empty second field drops that test class).

Problems in the class map (unreadable or malformed file, a class the model or the test data
does not have) raise :class:`~landlens.errors.ConfigError`; test data that cannot be evaluated
(no class shared with the model, a model class missing from an in-dataset test folder) raise
:class:`~landlens.errors.DatasetError`. Both name the file or folder and the class.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from landlens.data.folder import ImageFolderDataset
from landlens.errors import ConfigError, DatasetError

ClassMap = dict[str, Union[str, None]]
ClassMapLike = Union[Mapping[str, Union[str, None]], str, os.PathLike]

_HEADERS = {("test_class", "train_class"), ("test", "train")}
_MAX_LISTED = 8


def normalize_class_name(name: str) -> str:
    """The key two class names are matched on: lower case, without ``_``, ``-`` and whitespace."""
    return re.sub(r"[\s_\-]+", "", str(name)).casefold()


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _hint(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _value(raw: Any) -> str | None:
    if raw is None:
        return None
    text = str(raw).strip()
    return text or None


def _parse_json(text: str, source: str) -> ClassMap:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"class map {source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"class map {source}: expected a JSON object {{\"test_class\": \"train_class\"}}, "
                          f"got {type(data).__name__}")
    out: ClassMap = {}
    for key, val in data.items():
        test = str(key).strip()
        if not test:
            raise ConfigError(f"class map {source}: an empty test class name")
        if val is not None and not isinstance(val, str):
            raise ConfigError(f"class map {source}: test class {test!r} maps to {val!r}; "
                              f"expected a train class name or null")
        if test in out:
            raise ConfigError(f"class map {source}: test class {test!r} is given twice")
        out[test] = _value(val)
    return out


def _parse_table(text: str, source: str) -> ClassMap:
    out: ClassMap = {}
    first_row = True
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        delimiter = "\t" if "\t" in line else ","
        try:
            fields = next(csv.reader(io.StringIO(stripped), delimiter=delimiter))
        except (csv.Error, StopIteration) as exc:
            raise ConfigError(f"class map {source}, line {lineno}: cannot parse {stripped!r} ({exc})") from None
        fields = [f.strip() for f in fields]
        while len(fields) > 2 and fields[-1] == "":
            fields.pop()  # trailing delimiters
        if len(fields) > 2:
            raise ConfigError(f"class map {source}, line {lineno}: expected 'test_class,train_class', "
                              f"got {len(fields)} fields in {stripped!r}")
        if first_row:
            first_row = False
            if tuple(f.casefold() for f in fields) in _HEADERS:
                continue
        test = fields[0]
        if not test:
            raise ConfigError(f"class map {source}, line {lineno}: empty test class in {stripped!r}")
        if test in out:
            raise ConfigError(f"class map {source}, line {lineno}: test class {test!r} is given twice")
        out[test] = _value(fields[1]) if len(fields) == 2 else None
    return out


def load_class_map(
    path: str | os.PathLike,
    *,
    model_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
) -> ClassMap:
    """Read a class map file into ``{test_class: train_class or None}``.

    ``.json`` files (or any file starting with ``{``) are read as a JSON object, anything else as
    a CSV/TSV table (see the module docstring). With ``model_classes`` and/or ``test_classes``
    the names are checked and rewritten to the exact spelling of those lists (see
    :func:`resolve_class_map`).

    Raises:
        ConfigError: missing or unreadable file, malformed line (with its number), a test
            class given twice, or a class not in ``model_classes``/``test_classes``.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"class map not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"class map {p} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read class map {p}: {exc}") from None
    source = str(p)
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        mapping = _parse_json(text, source)
    else:
        mapping = _parse_table(text, source)
    if not mapping:
        raise ConfigError(f"class map {p} maps no class")
    return resolve_class_map(mapping, model_classes=model_classes, test_classes=test_classes, source=source)


def _resolve_name(name: str, choices: Sequence[str], what: str, source: str) -> str:
    if name in choices:
        return name
    key = normalize_class_name(name)
    found = [c for c in choices if normalize_class_name(c) == key]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"class map {source}: {what} {name!r} is ambiguous ({_listing(found)})")
    where = "the model" if what == "train class" else "the test data"
    raise ConfigError(f"class map {source}: {what} {name!r} is not a class of {where}{_hint(name, choices)}")


def resolve_class_map(
    mapping: Mapping[str, str | None],
    *,
    model_classes: Sequence[str] | None = None,
    test_classes: Sequence[str] | None = None,
    source: str = "(given as a dict)",
) -> ClassMap:
    """Check a class map against the model's and the test data's classes.

    Names are matched exactly, else after :func:`normalize_class_name`; the result uses the
    exact spelling of ``model_classes``/``test_classes``. :class:`ConfigError` names ``source``
    and the first class that matches nothing (or two test entries that name the same class).
    """
    out: ClassMap = {}
    origin: dict[str, str] = {}
    for test, train in mapping.items():
        t = _resolve_name(str(test), test_classes, "test class", source) if test_classes is not None else str(test)
        tr = _value(train)
        if tr is not None and model_classes is not None:
            tr = _resolve_name(tr, model_classes, "train class", source)
        if t in out:
            raise ConfigError(f"class map {source}: {test!r} and {origin[t]!r} are the same test class {t!r}")
        out[t] = tr
        origin[t] = str(test)
    return out


def _dataset_where(ds: ImageFolderDataset) -> str:
    return f"{ds.name} ({ds.root})" if ds.name and ds.name != ds.root.name else str(ds.root)


def apply_class_map(
    test_dataset: ImageFolderDataset,
    model_classes: Sequence[str],
    mapping: ClassMapLike | None = None,
) -> tuple[ImageFolderDataset, np.ndarray, dict[str, Any]]:
    """Keep the test images whose class the model knows and relabel them with model class indices.

    Args:
        test_dataset: the scanned test folder.
        model_classes: the model's classes, in its output order.
        mapping: ``None`` (match identical names, see :func:`normalize_class_name`), a dict
            ``{test_class: train_class or None}`` or the path of a class map file.

    Returns:
        ``(subset, targets, report)``: the images kept (``subset.labels`` still index the test
        dataset's classes), their labels as indices into ``model_classes``, and a JSON-ready
        report of kept and dropped test classes with image counts and the model classes no test
        class maps to.

    Raises:
        ConfigError: a bad class map (see :func:`load_class_map`).
        DatasetError: no test class maps to a model class.
    """
    model_classes = [str(c) for c in model_classes]
    test_classes = list(test_dataset.classes)
    counts = test_dataset.class_counts()
    source: str | None = None
    if mapping is None:
        mode = "by_name"
        model_keys: dict[str, list[str]] = {}
        for c in model_classes:
            model_keys.setdefault(normalize_class_name(c), []).append(c)
        resolved: ClassMap = {}
        reasons: dict[str, str] = {}
        for c in test_classes:
            hits = model_keys.get(normalize_class_name(c), [])
            if len(hits) > 1:
                raise DatasetError(f"test class {c!r} matches several model classes ({_listing(hits)}); "
                                   f"pass a class map to choose")
            resolved[c] = hits[0] if hits else None
            if not hits:
                reasons[c] = "no model class of that name"
    else:
        mode = "class_map"
        if isinstance(mapping, Mapping):
            resolved = resolve_class_map(mapping, model_classes=model_classes, test_classes=test_classes)
        else:
            source = str(Path(mapping).expanduser())
            resolved = load_class_map(mapping, model_classes=model_classes, test_classes=test_classes)
        reasons = {c: "mapped to null" for c, v in resolved.items() if v is None}
        for c in test_classes:
            if c not in resolved:
                resolved[c] = None
                reasons[c] = "not in the class map"

    model_index = {c: i for i, c in enumerate(model_classes)}
    lut = np.full(len(test_classes), -1, dtype=np.int64)
    kept, dropped = [], []
    for i, c in enumerate(test_classes):
        target = resolved.get(c)
        if target is None:
            dropped.append({"test_class": c, "images": counts[c], "reason": reasons.get(c, "dropped")})
        else:
            lut[i] = model_index[target]
            kept.append({"test_class": c, "train_class": target, "images": counts[c]})
    if not kept:
        how = f"class map {source}" if source else ("the class map" if mode == "class_map" else "name")
        raise DatasetError(
            f"{_dataset_where(test_dataset)}: no test class matches a model class by {how} "
            f"(test: {_listing(test_classes)}; model: {_listing(model_classes)}); "
            f"pass a class map (--class-map) to map them"
        )
    targets_all = lut[test_dataset.labels]
    idx = np.flatnonzero(targets_all >= 0)
    subset = test_dataset.subset(idx)
    targets = targets_all[idx]
    mapped_to = {k["train_class"] for k in kept}
    report = {
        "mode": mode,
        "class_map": source,
        "kept": kept,
        "dropped": dropped,
        "model_classes_without_test_images": [c for c in model_classes if c not in mapped_to],
        "images_kept": int(idx.size),
        "images_dropped": int(len(test_dataset) - idx.size),
    }
    return subset, targets, report


def check_same_classes(test_dataset: ImageFolderDataset, model_classes: Sequence[str]) -> np.ndarray:
    """For in-dataset evaluation: require the test folder to hold exactly the model's classes.

    Returns the test labels as indices into ``model_classes`` (equal to ``test_dataset.labels``
    when both class lists are in the same order).

    Raises:
        DatasetError: a model class has no (non-empty) folder in the test data, or the test data
            has a class the model was not trained on; the message names the classes and folder.
    """
    model_classes = [str(c) for c in model_classes]
    have = set(test_dataset.classes)
    missing = [c for c in model_classes if c not in have]
    if missing:
        empty = set(test_dataset.empty_classes)
        named = [f"{c} (empty folder)" if c in empty else c for c in missing]
        raise DatasetError(
            f"{test_dataset.root}: {len(missing)} class folder(s) of the model missing from the test data: "
            f"{_listing(named)}; for another dataset's classes use cross-dataset evaluation with a class map"
        )
    known = set(model_classes)
    extra = [c for c in test_dataset.classes if c not in known]
    if extra:
        raise DatasetError(
            f"{test_dataset.root}: {len(extra)} class folder(s) the model was not trained on: {_listing(extra)}"
        )
    model_index = {c: i for i, c in enumerate(model_classes)}
    lut = np.array([model_index[c] for c in test_dataset.classes], dtype=np.int64)
    return lut[test_dataset.labels]


__all__ = [
    "ClassMap",
    "apply_class_map",
    "check_same_classes",
    "load_class_map",
    "normalize_class_name",
    "resolve_class_map",
]
