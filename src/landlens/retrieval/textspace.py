"""Search by words: an alignment and its text tower as one object, class prompts, zero-shot labels.

:class:`TextSpace` joins an :class:`~landlens.retrieval.alignment.Alignment` with the text tower
it was trained with (rebuilt from the identity the file records, and checked): sentences and
image features go in, unit vectors of the shared space come out. :meth:`TextSpace.class_vectors`
turns class names into classifier rows by prompt ensembling (the mean of a class's projected
template sentences, renormalised; Radford et al., CLIP, ICML 2021, Sec. 3.1.4), and
:func:`zero_shot` labels images with classes nobody trained on.

:class:`TextIndex` is what an archive keeps for text queries (the alignment file of a generation and the text vectors of its segments): the
alignment file and the archive's image vectors already projected into the shared space, so a
text query costs one text encoding and one matrix product.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from landlens.errors import LandlensError
from landlens.retrieval.alignment import Alignment

DEFAULT_TEMPLATES = (
    "{}",
    "a satellite image of {}.",
    "an aerial image of {}.",
    "a remote sensing image of {}.",
    "there is {} in the image.",
    "a satellite photo of {}.",
    "an aerial photo of {}.",
    "a top-down view of {}.",
    "{} seen from above.",
    "an overhead image of {}.",
    "a photo of {}.",
)
"""Prompt templates of :meth:`TextSpace.class_vectors` and of the class-prompt term of
:func:`~landlens.retrieval.textstudy.train_alignment` (``{}`` is the readable class name): the
``rich`` set of ``benchmarks/text_search.py``, chosen on the EuroSAT val part for training the
Lite0+SqueezeNet+GeoEmbed alignment (the four sets it compares are within about one point of
each other there)."""



@lru_cache(maxsize=8)
def _word_set(vocab: frozenset[str]) -> frozenset[str]:
    return frozenset(w for w in vocab if w.isalpha() and len(w) >= 3)


def readable_class_name(name: str, vocabulary: Sequence[str] | frozenset[str] | None = None) -> str:
    """A folder name as words: ``"HerbaceousVegetation"`` -> ``"herbaceous vegetation"``,
    ``"parking_lot"`` -> ``"parking lot"``; with a ``vocabulary`` (the text tower's whole-word
    tokens), a run-together word it does not know is split into the fewest known words of three
    letters or more (``"denseresidential"`` -> ``"dense residential"``) when such a split exists."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])|[_\-.]+", " ", name.strip())
    words = [w.lower() for w in spaced.split() if w]
    if not vocabulary:
        return " ".join(words) or name
    known = _word_set(frozenset(vocabulary))
    out = []
    for w in words:
        if w in known or not w.isalpha():
            out.append(w)
            continue
        best: list[list[str] | None] = [[]] + [None] * len(w)  # best[i]: fewest words covering w[:i]
        for i in range(1, len(w) + 1):
            for j in range(max(0, i - 20), i - 2):
                if best[j] is not None and w[j:i] in known and (best[i] is None or len(best[j]) + 1 < len(best[i])):
                    best[i] = [*best[j], w[j:i]]
        out.extend(best[-1] if best[-1] else [w])
    return " ".join(out)


def tower_vocabulary(tower: Any) -> frozenset[str] | None:
    """The tokens of a text tower's tokenizer (what :func:`readable_class_name` splits run-together
    names into), or ``None`` for a tower without a vocabulary to list."""
    vocab = getattr(getattr(tower, "tokenizer", None), "get_vocab", None)
    return frozenset(vocab()) if vocab is not None else None


def class_prompts(classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                  vocabulary: Sequence[str] | frozenset[str] | None = None) -> list[list[str]]:
    """Per class, its prompt sentences: every template filled with the readable class name."""
    for t in templates:
        if "{}" not in t:
            raise LandlensError(f"prompt template {t!r} has no {{}} for the class name")
    return [[t.format(readable_class_name(c, vocabulary)) for t in templates] for c in classes]


def read_templates(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Prompt templates from a text file, one per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LandlensError(f"cannot read prompt templates {path}: {exc}") from None
    out = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not out:
        raise LandlensError(f"{path} holds no prompt template")
    return out


@dataclass
class TextSpace:
    """An alignment with its (checked) text tower: the shared space of words and images."""

    alignment: Alignment
    tower: Any  # landlens.models.text.TextTower

    @property
    def dim(self) -> int:
        return self.alignment.dim

    def vocabulary(self) -> frozenset[str] | None:
        return tower_vocabulary(self.tower)

    def queries(self, sentences: Sequence[str]) -> np.ndarray:
        """Unit vectors ``(n, dim)`` of sentences in the shared space."""
        if isinstance(sentences, str):
            raise TypeError("queries() takes a list of sentences, not one string")
        for s in sentences:
            if not isinstance(s, str) or not s.strip():
                raise LandlensError("a text query must be a non-empty sentence")
        return self.alignment.texts(self.tower.encode(list(sentences)))

    def images(self, features: Any) -> np.ndarray:
        """Unit vectors ``(n, dim)`` of image-tower features in the shared space."""
        return self.alignment.images(features)

    def class_vectors(self, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """``(classes, dim)`` unit rows: each class's prompts projected, averaged, renormalised."""
        if not classes:
            raise LandlensError("zero-shot labelling needs at least one class name")
        prompts = class_prompts(classes, templates, self.vocabulary())
        flat = self.queries([p for ps in prompts for p in ps]).reshape(len(classes), len(templates), -1)
        mean = flat.mean(axis=1)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def open_text_space(alignment: str | os.PathLike[str] | Alignment, text_weights: str | None = None) -> TextSpace:
    """The text space of an alignment file: its text tower rebuilt from the recorded identity
    (the packaged MiniLM, a model folder, a CLIP-family checkpoint; ``text_weights`` points at
    moved weights) and checked against the recorded digest.

    Raises:
        CheckpointError: a missing or damaged alignment file.
        AlignmentMismatchError: the text tower found is not the recorded one.
    """
    from landlens.models.text import create_text_tower

    al = alignment if isinstance(alignment, Alignment) else Alignment.load(alignment)
    rec = al.text_tower
    if not rec.get("name"):
        raise LandlensError("the alignment records no text tower; it cannot encode text queries")
    source = rec.get("source")
    weights = text_weights or ("package" if source == "package" else f"hub:{rec['ref']}" if source == "hub"
                               else str(rec.get("ref")))
    tower = create_text_tower(rec.get("tower", rec["name"]), weights)
    al.check_text(tower.info.to_dict())
    return TextSpace(al, tower)


def zero_shot(space: TextSpace, features: Any, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
              ) -> np.ndarray:
    """``(n, classes)`` probabilities of image-tower features under the classes' prompt vectors."""
    return class_probabilities(space, space.images(features), space.class_vectors(classes, templates))


def class_probabilities(space: TextSpace, vectors: np.ndarray, class_vectors: np.ndarray) -> np.ndarray:
    """``(n, classes)`` softmax of the learned logit scale times the cosine of shared-space
    image ``vectors`` with ``class_vectors`` (:meth:`TextSpace.class_vectors`)."""
    import torch

    logits = float(space.alignment.logit_scale.detach().exp()) * np.asarray(vectors, np.float32) @ class_vectors.T
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


@dataclass
class TextIndex:
    """An archive's text side: the alignment and its image vectors in the shared space (row i =
    archive row i; each segment keeps its rows' in ``text/vectors.npy``), searched exactly by
    inner product."""

    alignment: Alignment
    vectors: np.ndarray  # (n, dim) float32 unit rows

    def scores(self, q: np.ndarray) -> np.ndarray:
        """Cosine of each query row with every archive row ``(nq, n)``."""
        return np.asarray(q, np.float32) @ np.asarray(self.vectors).T


__all__ = ["DEFAULT_TEMPLATES", "TextIndex", "TextSpace", "class_probabilities", "class_prompts",
           "open_text_space", "read_templates", "readable_class_name", "tower_vocabulary", "zero_shot"]
