"""Captions files: sentences that describe images, for training and evaluating search by words.

Two formats are read, both with image paths relative to the captions file's own folder (or
absolute):

- **JSON**, the layout of UCM-captions (Qu et al., "Deep semantic understanding of high
  resolution remote sensing image", CITS 2016) and of the RSICD / Sydney-captions releases in
  the same shape::

      {"images": [{"image": "Images/agricultural/agricultural00.jpg", "split": "train",
                   "sentences": ["There is a piece of farmland", ...]}, ...]}

  (``"filename"`` is accepted for ``"image"``, and sentences given as ``{"raw": "..."}``
  objects as in the Karpathy-style files; ``split`` defaults to ``train``);
- **CSV** with a header holding ``image`` and ``sentence`` columns and optionally ``split``:
  one row per sentence, rows of one image gathered in file order.

:func:`match_captions` pairs the images of a captions file with the rows of a feature set.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from landlens.errors import LandlensError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a captions file: its path as written in the file, split and sentences."""

    image: str
    split: str
    sentences: tuple[str, ...]


class CaptionsError(LandlensError):
    """A captions file that is missing, malformed, or names images that are not in the data."""


def _json_items(p: Path) -> list[CaptionedImage]:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CaptionsError(f"cannot read captions file {p}: {exc}") from None
    items = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise CaptionsError(f"{p}: expected {{\"images\": [{{\"image\", \"split\", \"sentences\"}}, ...]}}")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not (it.get("image") or it.get("filename")) or "sentences" not in it:
            raise CaptionsError(f"{p}: image entry {i} lacks 'image' or 'sentences'")
        raw = it["sentences"]
        if not isinstance(raw, list):
            raise CaptionsError(f"{p}: 'sentences' of image entry {i} is not a list")
        sentences = tuple(str(s.get("raw", "") if isinstance(s, dict) else s).strip() for s in raw)
        out.append(CaptionedImage(str(it.get("image") or it.get("filename")), str(it.get("split") or "train"),
                                  tuple(s for s in sentences if s)))
    return out


def _csv_items(p: Path) -> list[CaptionedImage]:
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CaptionsError(f"cannot read captions file {p}: {exc}") from None
    if not rows or not {"image", "sentence"} <= set(rows[0]):
        raise CaptionsError(f"{p}: expected a CSV header with 'image' and 'sentence' columns (and optionally 'split')")
    gathered: dict[str, tuple[str, list[str]]] = {}
    for r in rows:
        image, sentence = (r.get("image") or "").strip(), (r.get("sentence") or "").strip()
        if not image:
            raise CaptionsError(f"{p}: a row has an empty 'image'")
        split = (r.get("split") or "train").strip()
        prev = gathered.setdefault(image, (split, []))
        if prev[0] != split:
            raise CaptionsError(f"{p}: image {image!r} is in two splits ({prev[0]!r} and {split!r})")
        if sentence:
            prev[1].append(sentence)
    return [CaptionedImage(image, split, tuple(s)) for image, (split, s) in gathered.items()]


def read_captions(path: str | os.PathLike[str]) -> list[CaptionedImage]:
    """The images of a captions file (module docstring), in file order.

    Raises:
        CaptionsError: a missing or malformed file, an image with no sentence, an unknown split,
            or an image listed twice, naming what is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise CaptionsError(f"captions file not found: {p}")
    items = _csv_items(p) if p.suffix.lower() == ".csv" else _json_items(p)
    seen: set[str] = set()
    for it in items:
        if not it.sentences:
            raise CaptionsError(f"{p}: image {it.image!r} has no sentence")
        if it.split not in SPLITS:
            raise CaptionsError(f"{p}: image {it.image!r} has split {it.split!r}; use one of {', '.join(SPLITS)}")
        if it.image in seen:
            raise CaptionsError(f"{p}: image {it.image!r} is listed twice")
        seen.add(it.image)
    return items


def match_captions(captions_file: str | os.PathLike[str], items: Sequence[CaptionedImage],
                   root: str | os.PathLike[str], paths: Sequence[str]) -> list[int]:
    """Row in ``paths`` (relative to ``root``, as a feature set names its images) of each
    captioned image, whose path is relative to the captions file's folder.

    Raises:
        CaptionsError: an image of the captions file that is not among ``paths``, naming it.
    """
    base = Path(captions_file).resolve().parent
    row = {os.path.normpath(Path(root).resolve() / p): i for i, p in enumerate(paths)}
    out = []
    for it in items:
        key = os.path.normpath(base / it.image)
        if key not in row:
            raise CaptionsError(f"{captions_file}: image {it.image!r} is not among the {len(paths)} images of "
                                f"{root} (paths are relative to the captions file's folder)")
        out.append(row[key])
    return out


__all__ = ["SPLITS", "CaptionedImage", "CaptionsError", "match_captions", "read_captions"]
