"""Searching an archive by words: text queries, text + image queries, zero-shot labels.

:class:`ArchiveTextSearch` is the words half of :class:`~landlens.retrieval.archive.Archive`.
An archive answers text queries once an image-text alignment trained on its features is
attached (:meth:`ArchiveTextSearch.enable_text`): the alignment file and the archive's vectors
projected into the shared space are kept in every generation (``text/``) and follow each add
and remove, so a query costs one text encoding and one exact inner-product scan of the
projected vectors (``n x dim`` multiply-adds: about 2 ms for 100,000 images of 256 dimensions).

A query is a sentence, an image (id, file, PIL image or archive vector) "with" a sentence
(their unit vectors mixed: ``normalise((1 - w) t + w i)``, ``w = image_weight``), and may be
refined by relevance feedback (Rocchio in the shared space). :meth:`ArchiveTextSearch.zero_shot`
labels images with any class names by prompt ensembling.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from landlens.retrieval.feedback import rocchio, rocchio_weights
from landlens.retrieval.generations import ArchiveError, Generation, UnknownImageError
from landlens.retrieval.search import ArchiveHit, marked_rows
from landlens.retrieval.textspace import DEFAULT_TEMPLATES

DEFAULT_IMAGE_WEIGHT = 0.5
"""Share of the image in a text + image query (the rest is the sentence)."""


class ArchiveTextSearch:
    """Search by words (a mixin of :class:`~landlens.retrieval.archive.Archive`, which provides
    ``_state``, ``_set_alignment``, ``features_identity``, ``load_query``, ``embed`` and
    ``directory``)."""

    _state: Generation

    def _init_text(self) -> None:
        self._text_lock = threading.Lock()
        self._text_space: tuple[Any, Any] | None = None  # (alignment object, TextSpace)
        self._text_weights: str | None = None

    # ------------------------------------------------------------------ attaching an alignment
    @property
    def has_text(self) -> bool:
        """Whether this archive answers text queries (an alignment is attached)."""
        return self._state.text is not None

    def enable_text(self, alignment: str | os.PathLike[str] | Any | None) -> None:
        """Attach an image-text alignment trained on this archive's features (a file of
        ``landlens retrieval align`` or an :class:`~landlens.retrieval.alignment.Alignment`), or
        detach it (``None``); writes a new generation.

        Raises:
            AlignmentMismatchError: the alignment was trained on other image features.
            CheckpointError: a missing or damaged alignment file.
        """
        from landlens.retrieval.alignment import Alignment

        al = None if alignment is None else alignment if isinstance(alignment, Alignment) else Alignment.load(alignment)
        if al is not None:
            al.check_images(self.features_identity())  # type: ignore[attr-defined]
            if not al.text_tower.get("name"):
                raise ArchiveError("the alignment records no text tower; it cannot answer text queries")
        self._set_alignment(al)  # type: ignore[attr-defined]

    def use_text_weights(self, weights: str) -> None:
        """Load the text tower from other weights (``create_text_tower``'s argument: a model
        folder or checkpoint that moved); they must have the recorded digest."""
        self._text_weights = weights
        self._text_space = None

    def text_space(self) -> Any:
        """The :class:`~landlens.retrieval.textspace.TextSpace` of the attached alignment (its
        text tower is loaded once and checked).

        Raises:
            ArchiveError: no alignment is attached.
        """
        from landlens.retrieval.textspace import open_text_space

        text = self._state.text
        if text is None:
            raise ArchiveError(f"archive {self.directory} answers no text queries: attach an alignment with "  # type: ignore[attr-defined]
                               f"`landlens index text ARCHIVE ALIGNMENT` (train one with `landlens retrieval align`)")
        with self._text_lock:
            cached = self._text_space
            if cached is not None and cached[0] is text.alignment:
                return cached[1]
            if cached is not None and cached[1].alignment.text_tower == text.alignment.text_tower:
                space = type(cached[1])(text.alignment, cached[1].tower)  # a new generation, same tower
            else:
                space = open_text_space(text.alignment, self._text_weights)
            self._text_space = (text.alignment, space)
            return space

    def text_info(self) -> dict[str, Any] | None:
        """The attached alignment: towers, head, what it was trained on (``None``: none)."""
        text = self._state.text
        if text is None:
            return None
        al = text.alignment
        return {"head": al.settings["head"], "dim": al.dim, "image_tower": al.image_tower.get("backbone"),
                "text_tower": al.text_tower.get("name"), "trained": al.trained}

    # ------------------------------------------------------------------ queries
    def _image_in_space(self, state: Generation, image: Any, max_pixels: int | None) -> tuple[np.ndarray, int | None]:
        """The shared-space vector of an image query, and its archive id when it is one."""
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            row = state.row_of.get(int(image))
            if row is None:
                raise UnknownImageError(f"no image with id {image} in the archive")
            return np.asarray(state.text.vectors[row], np.float32), int(image)
        if isinstance(image, (str, os.PathLike)):
            image = self.load_query(image, max_pixels=max_pixels)  # type: ignore[attr-defined]
        if hasattr(image, "mode") and hasattr(image, "size"):
            vector = self.embed([image])[0]  # type: ignore[attr-defined]
        else:
            vector = np.asarray(image, np.float32).reshape(-1)
        return state.text.alignment.images(vector[None])[0], None

    def text_query_vector(self, text: str | None = None, *, image: Any = None, image_weight: float = DEFAULT_IMAGE_WEIGHT,
                          relevant: Sequence[int] = (), irrelevant: Sequence[int] = (), weights: Any = None,
                          max_pixels: int | None = None) -> tuple[np.ndarray, int | None]:
        """The shared-space query of a sentence, an image, or both mixed, refined by feedback;
        and the archive id of the image when it is one (left out of the results)."""
        state = self._state
        space = self.text_space()
        if text is None and image is None:
            raise ArchiveError("a text search needs a sentence, an image, or both")
        if not 0.0 <= float(image_weight) <= 1.0:
            raise ArchiveError(f"image_weight must be within [0, 1], got {image_weight!r}")
        q = np.zeros(space.dim, np.float32)
        own = None
        if text is not None:
            q += (1.0 - float(image_weight) if image is not None else 1.0) * space.queries([text])[0]
        if image is not None:
            iv, own = self._image_in_space(state, image, max_pixels)
            q += (float(image_weight) if text is not None else 1.0) * iv
        if not np.linalg.norm(q) > 0:
            raise ArchiveError("the text and image of the query cancel out; change image_weight")
        q /= np.linalg.norm(q)
        if relevant or irrelevant:
            both = sorted(set(relevant) & set(irrelevant))
            if both:
                raise ArchiveError(f"image {both[0]} is marked both relevant and not relevant")
            w = rocchio_weights(weights)
            q = rocchio(q, self._text_rows(state, relevant, "relevant"), self._text_rows(state, irrelevant, "irrelevant"),
                        a=w.a, b=w.b, c=w.c)
        return q.astype(np.float32), own

    @staticmethod
    def _text_rows(state: Generation, ids: Sequence[int], what: str) -> np.ndarray:
        rows = marked_rows(state, ids, what)
        return np.asarray(state.text.vectors[rows], np.float32) if rows else np.zeros((0, state.text.vectors.shape[1]))

    def search_text(self, text: str | None = None, k: int = 10, *, image: Any = None,
                    image_weight: float = DEFAULT_IMAGE_WEIGHT, class_name: str | None = None,
                    relevant: Sequence[int] = (), irrelevant: Sequence[int] = (), weights: Any = None,
                    max_pixels: int | None = None) -> list[ArchiveHit]:
        """The ``k`` archive images nearest a sentence (``"harbor with many boats"``), an image
        with a sentence (``image``: an id, a file, a PIL image; ``image_weight`` its share), or
        either refined by relevance feedback (``relevant`` / ``irrelevant`` ids, Rocchio
        ``weights``); ``class_name`` keeps one class. ``score`` is the cosine in the shared
        space, ``distance`` one minus it.

        Raises:
            ArchiveError: no alignment attached, an empty query, a bad ``k`` or class.
        """
        state = self._state
        if isinstance(k, bool) or int(k) < 1:
            raise ArchiveError(f"k must be a positive integer, got {k!r}")
        if class_name is not None and class_name not in set(state.classes.tolist()):
            raise ArchiveError(f"class {class_name!r} is not in the archive")
        q, own = self.text_query_vector(text, image=image, image_weight=image_weight, relevant=relevant,
                                        irrelevant=irrelevant, weights=weights, max_pixels=max_pixels)
        scores = state.text.scores(q[None])[0]
        if class_name is not None:
            scores = np.where(state.classes == class_name, scores, -np.inf)
        if own is not None:
            scores[state.row_of[own]] = -np.inf
        n = int(np.isfinite(scores).sum())
        k = min(int(k), n)
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]  # best first, ties by row
        return [ArchiveHit(i + 1, state.records[int(r)], float(1.0 - scores[r]), float(scores[r]))
                for i, r in enumerate(top)]

    def zero_shot(self, images: Sequence[Any], classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                  *, max_pixels: int | None = None) -> np.ndarray:
        """``(images, classes)`` zero-shot probabilities of images (files, PIL images or
        archive ids) under any class names, by the attached alignment's prompt ensembles."""
        from landlens.retrieval.textspace import class_probabilities

        state = self._state
        space = self.text_space()
        vecs = np.stack([self._image_in_space(state, im, max_pixels)[0] for im in images])
        return class_probabilities(space, vecs, space.class_vectors(list(classes), templates))


def search_text_files(archive: Any, text: str, paths: Sequence[str | os.PathLike[str]] = (), k: int = 10, *,
                      image_weight: float = DEFAULT_IMAGE_WEIGHT, class_name: str | None = None,
                      relevant: Sequence[int] = (), irrelevant: Sequence[int] = (), weights: Any = None,
                      max_pixels: int | None = None) -> list[Any]:
    """What ``landlens search ARCHIVE --text`` runs: the sentence alone (no ``paths``), or each
    query image combined with it, as :class:`~landlens.retrieval.search.SearchResult` lists.
    Every image is decoded before any search runs."""
    from pathlib import Path

    from landlens.retrieval.generations import sha256_file
    from landlens.retrieval.search import SearchResult

    if isinstance(k, bool) or int(k) < 1:
        raise ArchiveError(f"k must be a positive integer, got {k!r}")
    if (relevant or irrelevant) and len(paths) > 1:
        raise ArchiveError(f"relevance feedback refines one query; {len(paths)} queries given")
    options = {"image_weight": image_weight, "class_name": class_name, "relevant": relevant,
               "irrelevant": irrelevant, "weights": weights}
    if not paths:
        return [SearchResult(text, None, archive.search_text(text, int(k), **options), None, text)]
    images = [archive.load_query(p, max_pixels=max_pixels) for p in paths]
    out = []
    for p, img in zip(paths, images):
        own = archive.id_of_sha256(sha256_file(Path(p))[0])
        hits = archive.search_text(text, int(k), image=own if own is not None else img, **options)
        out.append(SearchResult(str(p), archive.record(own).class_name if own is not None else None, hits, own, text))
    return out


__all__ = ["DEFAULT_IMAGE_WEIGHT", "ArchiveTextSearch", "search_text_files"]
