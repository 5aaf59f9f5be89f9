"""Searching an archive: by image, vector or id; re-ranked without labels or by a learned
matcher; refined by relevance feedback.

:class:`ArchiveSearch` is the search half of :class:`~landlens.retrieval.archive.Archive` (the
other half stores and updates it). Every search ranks the archive's vectors in one of three
ways:

* **plain**: the FAISS index's nearest neighbours under the archive's metric;
* **unsupervised re-ranking** (``rerank="kreciprocal"``, ``"aqe+diffusion"``...,
  :mod:`landlens.retrieval.rerank`): fitted once per archive generation on its vectors (no
  labels) and kept until the next update, in this process and beside the archive (``rerank/``,
  so that the next process restores it instead of fitting it again), it ranks the whole
  archive per query;
* **learned matching** (``matcher=RUN``, a discriminator of ``landlens matching train-dml``
  trained on this archive's features): the index's ``shortlist`` nearest images are re-ranked
  by match probability (``distance = 1 - P(match)``).

Relevance feedback (:meth:`ArchiveSearch.refine`) moves a query vector by Rocchio's formula
(:func:`landlens.retrieval.feedback.rocchio`) with archive images marked relevant or not.

:func:`search_files` is what ``landlens search`` runs: query files decoded and embedded as the
archive's images were, each with its class when known, as :class:`SearchResult` lists.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landlens.retrieval.feedback import RocchioWeights, rocchio, rocchio_weights
from landlens.retrieval.generations import (ArchiveError, Generation, ImageRecord, UnknownImageError,
                                            rerank_state_path, sha256_file)

NO_RERANK = "none"
"""The ``rerank`` value that turns off an archive's default re-ranking for one search."""


@dataclass(frozen=True)
class ArchiveHit:
    """One search result: rank (1-based), the image, its distance and a similarity score.

    ``score`` is higher for more similar images: the cosine similarity (``1 - distance``) under
    the cosine metric, ``1 / (1 + distance)`` under the Euclidean one, the match probability with
    a learned matcher. With an unsupervised re-ranker ``distance`` is the re-ranked one (its
    order is the ranking) and ``score`` stays the plain cosine similarity of query and image.
    """

    rank: int
    record: ImageRecord
    distance: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {"rank": self.rank, "id": r.id, "name": r.name, "class": r.class_name, "width": r.width,
                "height": r.height, "distance": self.distance, "score": self.score}


def _read_state(path: Path) -> dict[str, np.ndarray] | None:
    """A re-ranker's fitted state kept beside the archive, or ``None`` (none kept, or unreadable:
    the re-ranker is then fitted again)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (OSError, SafetensorError):
        return None


def _write_state(path: Path, rr: Any) -> None:
    """Keep a fitted re-ranker's state for later processes; an archive this process may not write
    (read-only) keeps none, and every process fits it once."""
    from safetensors.numpy import save_file

    from landlens.atomic import atomic_path

    arrays = rr.fitted_state()
    if not arrays:
        return
    try:
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp))
    except OSError:
        pass


class ArchiveSearch:
    """Search methods of :class:`~landlens.retrieval.archive.Archive` (a mixin: the archive
    provides ``_state``, ``metric``, ``load_query``, ``embed`` and ``record``)."""

    _state: Generation
    metric: str
    directory: Path

    def _init_search(self) -> None:
        # the archive's recorded default (index build --rerank), fitted at the first search
        self._rerank_spec: str | None = self._state.meta.get("rerank")
        self._rerank_lock = threading.Lock()
        self._rerankers: dict[str, tuple[int, Any]] = {}  # spec -> (generation, fitted re-ranker)
        self._matchers: dict[str, Any] = {}

    def _score(self, distance: float) -> float:
        if not np.isfinite(distance):
            return 0.0
        return float(1.0 - distance) if self.metric == "cosine" else float(1.0 / (1.0 + distance))

    # ------------------------------------------------------------------ re-ranking
    @property
    def rerank(self) -> str | None:
        """The unsupervised re-ranking spec searches use by default, or ``None``."""
        return self._rerank_spec

    def rerank_for(self, rerank: str | None = None) -> str | None:
        """The re-ranking a search given ``rerank`` uses: the archive's default for ``None``, none
        for ``"none"``, else ``rerank`` itself."""
        return self._rerank_spec if rerank is None else (None if rerank == NO_RERANK else rerank)

    def set_rerank(self, spec: str | None) -> None:
        """Re-rank every search without labels (:mod:`landlens.retrieval.rerank`: ``"aqe"``,
        ``"diffusion"``, ``"aqe+diffusion"``, ...), fitted now on the archive's vectors and
        again after each update; ``None`` turns it off. Ranks the whole archive per query
        (cost stated by :meth:`rerank_info`); needs the cosine metric."""
        if spec is None or spec == NO_RERANK:
            self._rerank_spec = None
            return
        self._fitted_reranker(self._state, spec)  # a bad spec is refused before anything changes
        self._rerank_spec = spec

    def _fitted_reranker(self, state: Generation, spec: str) -> Any:
        from landlens.retrieval.rerank import make_reranker

        if self.metric != "cosine":
            raise ArchiveError(f"re-ranking ranks by cosine similarity; this archive uses {self.metric}")
        with self._rerank_lock:
            cached = self._rerankers.get(spec)
            if cached is not None and cached[0] == state.generation:
                return cached[1]  # every search after the first: no spec parsing, no fit
            rr = make_reranker(spec)
            path = rerank_state_path(self.directory, state.generation, rr.spec)
            rr.fit(np.asarray(state.vectors, dtype=np.float32), state=_read_state(path))
            if not rr.restored_:
                _write_state(path, rr)
            self._rerankers = {s: v for s, v in self._rerankers.items() if v[0] == state.generation}
            self._rerankers[spec] = (state.generation, rr)
            return rr

    def rerank_info(self) -> dict[str, Any] | None:
        """The default re-ranker's settings, database size and fit time (``None`` when off)."""
        cached = self._rerankers.get(self._rerank_spec) if self._rerank_spec is not None else None
        return None if cached is None else cached[1].to_dict()

    def _reranked(self, state: Generation, spec: str, q: np.ndarray, k: int, class_name: str | None,
                  exclude: Sequence[int | None] | None, own: Sequence[int | None] | None) -> list[list[ArchiveHit]]:
        """Hits ranked by the re-ranker over the whole archive (filters applied after ranking).
        A query that is an archive image (``exclude`` or ``own``) takes that image's graph node."""
        import torch

        rr = self._fitted_reranker(state, spec)
        nodes = exclude if exclude is not None else own if own is not None else [None] * len(q)
        rows = np.array([state.row_of.get(int(x), -1) if x is not None else -1 for x in nodes], dtype=np.int64)
        dist = rr.distances(q, rows)
        cos = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(q)), dim=1) @ rr.database_.T
        order = torch.sort(dist, dim=1, stable=True).indices.numpy()
        return [self._collect(state, order[qi], dist[qi].numpy(), cos[qi].numpy(), k, class_name,
                              exclude[qi] if exclude is not None else None) for qi in range(len(q))]

    def features_identity(self) -> dict[str, Any]:
        """What identifies the archive's vectors for a model trained on such features (a matching
        discriminator, an image-text alignment): backbone, weights digest, preprocessing, dim."""
        ident = self._state.index.meta.get("identity") or {}
        out = {k: ident[k] for k in ("backbone", "weights_digest", "preprocessing") if ident.get(k) is not None}
        out["dim"] = int(self._state.index.dim_)
        return out

    # ------------------------------------------------------------------ learned matching
    def _matcher_distance(self, matcher: str | os.PathLike[str]) -> Any:
        """The discriminator at ``matcher`` as a distance on this archive's features (cached);
        it refuses features other than those it was trained on."""
        from landlens.retrieval.distances import get_distance

        key = str(Path(matcher).resolve())
        fn = self._matchers.get(key)
        if fn is None:
            fn = get_distance("learned", model=matcher, features=self.features_identity())
            self._matchers[key] = fn
        return fn

    def _matched(self, state: Generation, matcher: str | os.PathLike[str], shortlist: int, q: np.ndarray, k: int,
                 class_name: str | None, exclude: Sequence[int | None] | None) -> list[list[ArchiveHit]]:
        """The index's ``shortlist`` nearest images of each query, re-ranked by match probability."""
        import torch

        dist_fn = self._matcher_distance(matcher)
        n = len(state.records)
        _, cand = state.index.search(q, min(n, max(int(shortlist), k) + (1 if exclude is not None else 0)))
        out = []
        for qi in range(len(q)):
            rows = cand[qi][cand[qi] >= 0]
            d = dist_fn(torch.from_numpy(np.ascontiguousarray(q[qi:qi + 1])),
                        torch.from_numpy(np.ascontiguousarray(state.vectors[rows], dtype=np.float32)))[0].numpy()
            order = np.argsort(d, kind="stable")
            out.append(self._collect(state, rows[order], d[order], 1.0 - d[order], k, class_name,
                                     exclude[qi] if exclude is not None else None, aligned=True))
        return out

    # ------------------------------------------------------------------ searching
    def _collect(self, state: Generation, rows: np.ndarray, dist: np.ndarray, score: np.ndarray | None, k: int,
                 class_name: str | None, skip: int | None, aligned: bool = False) -> list[ArchiveHit]:
        """The first ``k`` of ``rows`` (best first) that pass the filters, as hits. ``dist`` and
        ``score`` are indexed by row (``aligned=False``) or by position in ``rows``."""
        hits: list[ArchiveHit] = []
        for pos, r in enumerate(rows):
            rec = state.records[int(r)]
            if rec.id == skip or (class_name is not None and rec.class_name != class_name):
                continue
            i = pos if aligned else int(r)
            d = float(dist[i])
            hits.append(ArchiveHit(len(hits) + 1, rec, d, float(score[i]) if score is not None else self._score(d)))
            if len(hits) == k:
                break
        return hits

    def search_vectors(self, vectors: Any, k: int, *, class_name: str | None = None,
                       exclude: Sequence[int | None] | None = None, rerank: str | None = None,
                       matcher: str | os.PathLike[str] | None = None, shortlist: int = 100,
                       own: Sequence[int | None] | None = None) -> list[list[ArchiveHit]]:
        """The ``k`` most similar images of each query vector (fewer when a filter leaves fewer).

        Args:
            vectors: (nq, dim) or (dim,) features from :meth:`embed`.
            k: hits per query (at least 1).
            class_name: keep only images of this class (must be a class of the archive).
            exclude: per query, an image id to leave out (the query itself when it is indexed;
                with a re-ranker, that image's node of the graph is the query's).
            rerank: an unsupervised re-ranking spec for this search (default: the archive's,
                :meth:`set_rerank`; ``"none"``: plain search).
            matcher: a matching discriminator run folder or file: re-rank the ``shortlist``
                nearest images by match probability (not combined with ``rerank``).
            own: per query, the id of the archive image the query is, kept in the results (a
                re-ranker uses its graph node, as for ``exclude``).
        """
        state = self._state
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if isinstance(k, bool) or int(k) < 1:
            raise ArchiveError(f"k must be a positive integer, got {k!r}")
        if exclude is not None and len(exclude) != len(q):
            raise ArchiveError(f"{len(exclude)} exclusions for {len(q)} queries")
        if class_name is not None and class_name not in set(state.classes.tolist()):
            raise ArchiveError(f"class {class_name!r} is not in the archive "
                               f"({', '.join(sorted(set(state.classes.tolist()) - {''})) or 'it has no classes'})")
        spec = self.rerank_for(rerank)
        if matcher is not None:
            if rerank not in (None, NO_RERANK):
                raise ArchiveError("a matching discriminator and an unsupervised re-ranking cannot be combined; "
                                   "choose one")
            if int(shortlist) < 1:
                raise ArchiveError(f"shortlist {shortlist}: must be >= 1")
            return self._matched(state, matcher, int(shortlist), q, int(k), class_name, exclude)
        if spec is not None and len(state.records) >= 2:
            return self._reranked(state, spec, q, int(k), class_name, exclude, own)
        return [self._nearest(state, q[qi:qi + 1], int(k), class_name, exclude[qi] if exclude is not None else None)
                for qi in range(len(q))]

    def _nearest(self, state: Generation, q: np.ndarray, k: int, class_name: str | None,
                 skip: int | None) -> list[ArchiveHit]:
        """Plain index search of one query, fetching more candidates until the filters leave ``k``."""
        n = len(state.records)
        eligible = int((state.classes == class_name).sum()) if class_name is not None else n
        want = min(k, eligible - (1 if skip is not None and self._eligible(state, skip, class_name) else 0))
        if want <= 0:
            return []
        fetch = min(n, k + 1 if class_name is None else max(4 * k, 64))
        while True:
            dist, rows = state.index.search(q, fetch)
            keep = rows[0] >= 0
            hits = self._collect(state, rows[0][keep], dist[0][keep], None, want, class_name, skip, aligned=True)
            if len(hits) >= want or fetch >= n:
                return hits
            fetch = min(n, fetch * 4)

    @staticmethod
    def _eligible(state: Generation, id: int, class_name: str | None) -> bool:
        row = state.row_of.get(int(id))
        return row is not None and (class_name is None or state.records[row].class_name == class_name)

    def search_id(self, id: int, k: int, *, class_name: str | None = None, **options: Any) -> list[ArchiveHit]:
        """The ``k`` images most similar to the indexed image ``id`` (itself left out)."""
        return self.search_vectors(self.vector(id)[None], k, class_name=class_name, exclude=[int(id)],
                                   **options)[0]

    def search(self, query: Any, k: int = 10, *, class_name: str | None = None, rerank: str | None = None,
               matcher: str | os.PathLike[str] | None = None, shortlist: int = 100,
               max_pixels: int | None = None) -> list[ArchiveHit]:
        """The ``k`` archive images most similar to ``query``, best first.

        ``query`` is an indexed image's id (``int``: the image itself is left out), an image
        file (decoded and embedded as the archive's images were; ``max_pixels`` limits it), an
        RGB :class:`PIL.Image.Image`, or a feature vector of the archive's dimension. The other
        arguments are those of :meth:`search_vectors`.
        """
        options = {"class_name": class_name, "rerank": rerank, "matcher": matcher, "shortlist": shortlist}
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            return self.search_id(int(query), k, **options)
        return self.search_vectors(self.query_vector(query, max_pixels=max_pixels)[None], k, **options)[0]

    def query_vector(self, query: Any, *, max_pixels: int | None = None) -> np.ndarray:
        """The feature vector ``(dim,)`` of a query as :meth:`search` takes it: an indexed image's
        id, an image file or chip reference, an RGB PIL image, or a vector (checked)."""
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            return self.vector(int(query))
        if isinstance(query, (str, os.PathLike)):
            query = self.load_query(query, max_pixels=max_pixels)
        if hasattr(query, "mode") and hasattr(query, "size"):  # a PIL image
            return self.embed([query])[0]
        vector = np.asarray(query, dtype=np.float32)
        if vector.ndim != 1 or vector.shape[0] != self.dim:
            raise ArchiveError(f"a query vector must have shape ({self.dim},), got {tuple(vector.shape)}")
        return vector

    # ------------------------------------------------------------------ relevance feedback
    def refine(self, vector: Any, relevant: Sequence[int] = (), irrelevant: Sequence[int] = (),
               weights: RocchioWeights | Sequence[float] | dict[str, Any] | None = None) -> np.ndarray:
        """Rocchio's refinement of a query vector with archive images marked relevant and not
        relevant (ids): ``q' = a q + b mean(relevant) - c mean(not relevant)`` on L2-normalised
        vectors (:func:`landlens.retrieval.feedback.rocchio`; default weights 1, 0.75, 0.15). On a
        Euclidean archive the unit result is scaled back to the query's length.

        Raises:
            UnknownImageError: an id that is not in the archive.
            ArchiveError: an id marked both ways.
            FeedbackError: nothing is left of the query (e.g. it was marked not relevant).
        """
        both = sorted(set(relevant) & set(irrelevant))
        if both:
            raise ArchiveError(f"image {both[0]} is marked both relevant and not relevant")
        w = rocchio_weights(weights)
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        scale = 1.0 if self.metric == "cosine" else (float(np.linalg.norm(q)) or 1.0)
        return rocchio(q, self._marked(relevant, "relevant"), self._marked(irrelevant, "irrelevant"),
                       a=w.a, b=w.b, c=w.c, scale=scale)

    def _marked(self, ids: Sequence[int], what: str) -> np.ndarray:
        state = self._state
        rows = marked_rows(state, ids, what)
        if not rows:
            return np.zeros((0, int(state.index.dim_)), dtype=np.float32)
        return np.asarray(state.vectors[rows], dtype=np.float32)


def marked_rows(state: Generation, ids: Sequence[int], what: str) -> list[int]:
    """Rows of the archive images ``ids`` marked by relevance feedback (``what``: "relevant" or
    "irrelevant", for the message).

    Raises:
        UnknownImageError: an id that is not in the archive.
    """
    rows = []
    for i in ids:
        row = state.row_of.get(int(i))
        if row is None:
            raise UnknownImageError(f"{what}: no image with id {i} in the archive")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- search by files


@dataclass
class SearchResult:
    """The hits of one query file, nearest first.

    ``query_class`` is the query's class when known (the query is an image of the archive, or
    the caller named it); a hit is relevant when its class equals it. ``query_id`` is the id of
    the archive image with the same content, if any. ``text`` is the sentence of a search by
    words (``query`` is then the image it was combined with, or the sentence itself).
    """

    query: str
    query_class: str | None
    hits: list[ArchiveHit] = field(default_factory=list)
    query_id: int | None = None
    text: str | None = None

    def relevant(self) -> list[bool | None]:
        """Per hit: same class as the query (``None`` when the query's class is unknown)."""
        if self.query_class is None:
            return [None] * len(self.hits)
        return [h.record.class_name == self.query_class for h in self.hits]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "query_class": self.query_class, "query_id": self.query_id,
                **({"text": self.text} if self.text is not None else {}),
                "hits": [{**h.to_dict(), "path": h.record.path, "relevant": r}
                         for h, r in zip(self.hits, self.relevant())]}


def search_files(archive: Any, paths: Sequence[str | os.PathLike[str]], k: int = 10, *,
                 query_classes: Sequence[str | None] | None = None, class_name: str | None = None,
                 rerank: str | None = None, matcher: str | os.PathLike[str] | None = None, shortlist: int = 100,
                 relevant: Sequence[int] = (), irrelevant: Sequence[int] = (),
                 weights: Any = None, max_pixels: int | None = None) -> list[SearchResult]:
    """Search ``archive`` with query image files; every file is decoded before any search runs.

    A query with the content of an archive image is that image (its class is known; it is
    found first, at distance 0). ``relevant`` / ``irrelevant`` (archive ids) refine the single
    query by relevance feedback (:meth:`ArchiveSearch.refine`) before searching.
    """
    if isinstance(k, bool) or int(k) < 1:
        raise ArchiveError(f"k must be a positive integer, got {k!r}")
    if int(k) > len(archive):
        raise ArchiveError(f"k={k} is larger than the archive ({len(archive)} images); ask for k <= {len(archive)}")
    if query_classes is not None:
        if len(query_classes) != len(paths):
            raise ArchiveError(f"{len(query_classes)} query classes for {len(paths)} queries")
        known = set(archive.classes)
        for c in query_classes:
            if c is not None and c not in known:
                raise ArchiveError(f"query class {c!r} is not a class of this archive "
                                   f"({', '.join(sorted(known)) or 'it has no classes'})")
    feedback = bool(relevant or irrelevant)
    if feedback and len(paths) != 1:
        raise ArchiveError(f"relevance feedback refines one query; {len(paths)} queries given")
    images = [archive.load_query(p, max_pixels=max_pixels) for p in paths]
    vectors = archive.embed(images)
    if feedback:
        vectors = archive.refine(vectors[0], relevant, irrelevant, weights)[None]
    own = [archive.id_of_sha256(sha256_file(Path(p))[0]) for p in paths]
    hits = archive.search_vectors(vectors, int(k), class_name=class_name, rerank=rerank, matcher=matcher,
                                  shortlist=shortlist, own=None if feedback else own)
    results = []
    for qi, p in enumerate(paths):
        qclass = query_classes[qi] if query_classes is not None else None
        if qclass is None and own[qi] is not None:
            qclass = archive.record(own[qi]).class_name
        results.append(SearchResult(str(p), qclass, hits[qi], own[qi]))
    return results


__all__ = ["NO_RERANK", "ArchiveHit", "ArchiveSearch", "SearchResult", "marked_rows", "search_files"]
