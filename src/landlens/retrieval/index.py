"""Nearest-neighbour search indexes over feature vectors, backed by FAISS.

:class:`SearchIndex` is a small scikit-learn style estimator: its settings are given to
``__init__``, :meth:`SearchIndex.fit` trains (where the index kind needs it) and adds the
database vectors, and what it learned carries a trailing underscore (``index_``,
``dim_``, ``kind_``, ``factory_``...). It answers ``search(queries, k) -> (distances,
indices)`` with ``distances`` in the units of the chosen metric:

- ``'euclidean'``: the L2 distance ``||q - x||`` (FAISS ``METRIC_L2`` works on squared
  distances; the square root is taken on the way out);
- ``'cosine'``: ``1 - cos(q, x)``, the inner-product distance of L2-normalised vectors
  (normalised with ``faiss.normalize_L2``), so 0 is the same direction and 2 the opposite.
  The FAISS index itself works with ``METRIC_L2`` on the normalised vectors, whose squared
  distance is ``||q - x||^2 = 2 - 2 cos(q, x)``: the ranking is the inner product's, the
  reported distance ``||q - x||^2 / 2`` equals ``1 - cos`` exactly (up to float rounding),
  and the approximate structures stay in the metric they are designed for (k-means
  centroids and PQ residuals are L2 constructs; HNSW graphs need a metric). All-zero
  vectors have no direction and are refused.

Index kinds (Johnson, Douze and Jegou, "Billion-scale similarity search with GPUs", IEEE
Trans. Big Data 2019, for the FAISS library; the structures named below are FAISS classes
built through ``faiss.index_factory``, whose short strings they also accept):

=============  ==========================================================================
``exact``      ``IndexFlat`` (factory ``"Flat"``): brute force, exact.
``hnsw``       ``IndexHNSWFlat`` (``"HNSW{M},Flat"``): hierarchical navigable small-world
               graph (Malkov and Yashunin, IEEE TPAMI 2020); ``hnsw_m`` links per node,
               ``ef_construction`` and ``ef_search`` beam widths.
``ivf-flat``   ``IndexIVFFlat`` (``"IVF{nlist},Flat"``): k-means inverted file with raw
               vectors; ``nlist`` lists (default about ``4 sqrt(N)``), ``nprobe`` visited.
               From :data:`HNSW_QUANTIZER_MIN_LIST` lists on, the list centroids are
               searched with an HNSW graph (``"IVF{nlist}_HNSW32,Flat"``, FAISS's advice for
               many lists): at 1280 dimensions a flat scan of 4,000 centroids costs as
               much as the lists themselves.
``ivf-pq``     ``IndexRefineFlat`` over ``IndexIVFPQ`` (``"IVF{nlist},PQ{m}x8np,RFlat"``):
               product-quantised inverted file (Jegou, Douze and Schmid, IEEE TPAMI 2011)
               whose ``refine_factor * k`` best candidates are re-ranked by exact
               distances, so recall stays close to that of the inverted file itself
               (``np``: no polysemous training, which costs minutes and serves only
               Hamming-filtered search).
``auto``       ``exact`` below :data:`AUTO_EXACT_MAX` vectors, else :data:`AUTO_LARGE_KIND`
               with the settings chosen by ``benchmarks/search_scale.py``.
other          any FAISS index-factory string, e.g. ``"IVF4096,PQ64"`` or ``"HNSW32,Flat"``.
=============  ==========================================================================

The build and search settings (``ef_construction``, ``ef_search``, ``nprobe``,
``refine_factor``) apply to every index holding the structure they tune, factory-built
ones included; change them on a fitted index and the next :meth:`SearchIndex.search` uses them.

Training (k-means for IVF, sub-quantisers for PQ) uses a seeded random sample of at most
``train_size`` database vectors. HNSW graphs are built with several threads and are not
bit-for-bit reproducible between runs; the other kinds are, for a given FAISS build.

Search by example image (:func:`search_images`): an index built from a feature store
(:func:`build_index_from_store`) records the store's extractor, so :func:`backbone_for_index`
rebuilds that backbone (same weights digest and preprocessing, checked), query images are
decoded and embedded as the archive was, and each hit comes back with its path and class.

An index is saved as a folder holding ``index.faiss`` (``faiss.write_index``) and
``index.json`` (kind, factory string, metric, dimension, size, settings, the caller's
``meta`` such as the identity of the feature store it indexes, and the rows' ``paths``,
``labels`` and ``classes``), written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from landlens.errors import LandlensError, first_line
from landlens.features.store import atomic_write_json

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
INDEX_JSON = "index.json"

METRICS = ("cosine", "euclidean")
KINDS = ("auto", "exact", "hnsw", "ivf-flat", "ivf-pq")

AUTO_EXACT_MAX = 50_000
"""``kind='auto'`` searches exactly below this many database vectors."""

AUTO_LARGE_KIND = "ivf-flat"
"""What ``kind='auto'`` builds for larger databases. In ``benchmarks/results/search_scale.md``
(1,000,000 x 1280, 2 cores) ``ivf-flat`` with the default ``nprobe`` reached recall@10 0.954
at 2.2 ms per query, 227x faster than exact search, and built in 2 minutes; HNSW was faster
per query but builds about 2,000 vectors/s at 1280-d (8+ minutes per million), and
``ivf-pq`` with 64-byte codes levelled off at recall 0.93."""

DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 16
DEFAULT_REFINE_FACTOR = 10
HNSW_QUANTIZER_MIN_LIST = 1024
"""IVF kinds with at least this many lists search their centroids with an HNSW graph."""
QUANTIZER_EF_SEARCH = 64
"""Beam width of an HNSW coarse quantizer (at least ``2 * nprobe``)."""
ADD_BLOCK = 65536
"""Rows copied, checked and added at a time by :meth:`SearchIndex.fit`."""
MIN_TRAIN_PER_LIST = 39
"""Vectors per list below which :func:`default_nlist` lowers ``nlist`` (FAISS's k-means rule)."""
TRAIN_PER_LIST = 16
"""Default IVF training sample: this many vectors per list (at least 65,536)."""
PQ_TRAIN_PER_CENTROID = 64
"""PQ sub-quantisers train on at most this many vectors per code word (x 256 words)."""


class SearchIndexError(LandlensError):
    """A search index that cannot be built, searched, saved or loaded as asked."""


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about ``4 sqrt(n)``, at most ``n / 39`` (at least 1)."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // MIN_TRAIN_PER_LIST)))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers of the PQ codes: the largest divisor of ``dim`` that is at most 64 and
    leaves at least 8 dimensions per sub-quantiser (e.g. 64 for 1280, 32 for 256, 8 for 64;
    FAISS k-means is slow on 4-d sub-vectors)."""
    best = 1
    for m in range(1, min(64, dim // 8) + 1):
        if dim % m == 0:
            best = m
    return best


def _faiss():
    import faiss

    return faiss


def _as_matrix(x: Any, what: str, offset: int = 0) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array (a copy, so it can be normalised in place);
    ``offset`` is added to row numbers in messages."""
    a = np.array(x, dtype=np.float32, copy=True, order="C")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise SearchIndexError(f"{what} must be a 2-d array (n, dim), got shape {tuple(a.shape)}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise SearchIndexError(f"{what}: {int(bad.sum())} row(s) hold NaN or infinite values "
                               f"(first at row {offset + int(np.flatnonzero(bad)[0])})")
    return a


class SearchIndex:
    """k-nearest-neighbour search over feature vectors with a FAISS index (module docstring).

    Args:
        kind: ``'auto'``, ``'exact'``, ``'hnsw'``, ``'ivf-flat'``, ``'ivf-pq'`` or a FAISS
            index-factory string.
        metric: ``'cosine'`` (distance ``1 - cos``) or ``'euclidean'`` (L2 distance).
        hnsw_m: HNSW links per node (``M``).
        ef_construction: HNSW beam width while building.
        ef_search: HNSW beam width while searching (raise for recall, lower for speed); the
            default reached recall@10 0.965 at 1.5 ms on 200,000 1280-d vectors.
        nlist: inverted lists of the IVF kinds; ``None`` for :func:`default_nlist`.
        nprobe: inverted lists visited per query (raise for recall, lower for speed); the
            default reached recall@10 0.954 at 2.2 ms with ``ivf-flat`` on 1,000,000
            1280-d vectors (``benchmarks/results/search_scale.md``).
        pq_m: PQ sub-quantisers (bytes per code) of ``'ivf-pq'``; ``None`` for
            :func:`default_pq_m`.
        refine_factor: ``'ivf-pq'`` re-ranks ``refine_factor * k`` candidates exactly.
        quantizer: how IVF kinds find the nearest lists: ``'flat'`` (exact scan of the
            centroids), ``'hnsw'`` (an HNSW32 graph over them, searched with beam width
            ``max(64, 2 * nprobe)``), or ``'auto'`` (``'hnsw'`` from
            :data:`HNSW_QUANTIZER_MIN_LIST` lists on).
        train_size: largest training sample; ``None`` for ``max(16 * nlist, 65536)``.
        seed: seed of the training sample and of FAISS k-means.
        meta: anything the caller wants saved with the index (e.g. the feature store's
            identity), JSON-serialisable.

    Attributes (after :meth:`fit`):
        index_: the FAISS index.
        kind_: the kind built (``'auto'`` resolved), or ``'factory'``.
        factory_: the FAISS factory string of the index built.
        dim_: vector dimension.
        nlist_: inverted lists (IVF kinds) or ``None``.
        n_train_: vectors used for training (0 when the kind needs none).
        build_seconds_: time spent training and adding in :meth:`fit`.
        paths_, labels_, classes_: what the rows are (optional, in row order).
    """

    def __init__(
        self,
        kind: str = "auto",
        metric: str = "cosine",
        *,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        pq_m: int | None = None,
        refine_factor: int = DEFAULT_REFINE_FACTOR,
        quantizer: str = "auto",
        train_size: int | None = None,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.metric = metric
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.nlist = nlist
        self.nprobe = nprobe
        self.pq_m = pq_m
        self.refine_factor = refine_factor
        self.quantizer = quantizer
        self.train_size = train_size
        self.seed = seed
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ settings
    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` settings (without ``meta``)."""
        return {k: getattr(self, k) for k in ("kind", "metric", "hnsw_m", "ef_construction", "ef_search",
                                               "nlist", "nprobe", "pq_m", "refine_factor", "quantizer", "train_size",
                                               "seed")}

    def _check_settings(self) -> None:
        if self.metric not in METRICS:
            raise SearchIndexError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "refine_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise SearchIndexError(f"{name} must be a positive integer, got {v!r}")
        if self.quantizer not in ("auto", "flat", "hnsw"):
            raise SearchIndexError(f"unknown quantizer {self.quantizer!r}: use auto, flat or hnsw")
        for name in ("nlist", "pq_m", "train_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise SearchIndexError(f"{name} must be a positive integer or None, got {v!r}")

    def _prepare(self, x: np.ndarray, what: str, offset: int = 0) -> np.ndarray:
        """Normalise rows in place for the cosine metric (refusing all-zero rows)."""
        if self.metric == "cosine" and x.size:
            zero = ~(np.abs(x).max(axis=1) > 0)
            if zero.any():
                raise SearchIndexError(f"{what}: {int(zero.sum())} all-zero row(s) (first at row "
                                       f"{offset + int(np.flatnonzero(zero)[0])}) have no cosine distance; "
                                       f"drop them or use metric='euclidean'")
            _faiss().normalize_L2(x)
        return x

    def resolve_kind(self, n: int) -> str:
        """The kind :meth:`fit` builds for ``n`` vectors (``'auto'`` resolved; ``'factory'``
        for a FAISS factory string)."""
        kind = self.kind.strip().lower() if isinstance(self.kind, str) else self.kind
        if kind == "auto":
            return "exact" if n < AUTO_EXACT_MAX else AUTO_LARGE_KIND
        if kind in KINDS:
            return kind
        if isinstance(self.kind, str) and self.kind.strip() and any(ch.isupper() for ch in self.kind):
            return "factory"
        raise SearchIndexError(
            f"unknown index kind {self.kind!r}: use one of {', '.join(KINDS)} or a FAISS factory string "
            f"such as 'IVF4096,PQ64' or 'HNSW32,Flat'"
        )

    def factory_string(self, n: int, dim: int) -> str:
        """The FAISS factory string :meth:`fit` builds for ``n`` vectors of ``dim`` dimensions."""
        kind = self.resolve_kind(n)
        if kind == "exact":
            return "Flat"
        if kind == "hnsw":
            return f"HNSW{int(self.hnsw_m)},Flat"
        nlist = int(self.nlist) if self.nlist is not None else default_nlist(n)
        hnsw_q = self.quantizer == "hnsw" or (self.quantizer == "auto" and nlist >= HNSW_QUANTIZER_MIN_LIST)
        ivf = f"IVF{nlist}_HNSW32" if hnsw_q else f"IVF{nlist}"
        if kind == "ivf-flat":
            return f"{ivf},Flat"
        if kind == "ivf-pq":
            m = int(self.pq_m) if self.pq_m is not None else default_pq_m(dim)
            if dim % m:
                raise SearchIndexError(f"pq_m={m} does not divide the dimension {dim}")
            return f"{ivf},PQ{m}x8np,RFlat"
        return self.kind.strip()

    # ------------------------------------------------------------------ learning
    def fit(self, vectors: Any, *, paths: Sequence[str] | None = None, labels: Sequence[int] | None = None,
            classes: Sequence[str] | None = None) -> "SearchIndex":
        """Build a new index on ``vectors`` (n, dim): train where the kind needs it, then add.

        ``vectors`` may be any array-like, a memory map included: it is read in blocks of
        :data:`ADD_BLOCK` rows, so the only full copy is the one the index keeps. ``paths``
        and ``labels`` (one per row) and ``classes`` (label names) are optional and kept with
        the index, so hits can be reported by name.
        """
        self._check_settings()
        data = np.asarray(vectors)
        if data.ndim != 2:
            raise SearchIndexError(f"database vectors must be a 2-d array (n, dim), got shape {tuple(data.shape)}")
        n, dim = data.shape
        if dim < 1:
            raise SearchIndexError("database vectors have 0 dimensions")
        for name, values in (("paths", paths), ("labels", labels)):
            if values is not None and len(values) != n:
                raise SearchIndexError(f"{len(values)} {name} for {n} vectors")
        faiss = _faiss()
        factory = self.factory_string(n, dim)
        kind = self.resolve_kind(n)
        t0 = time.perf_counter()
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise SearchIndexError(
                f"invalid index kind or FAISS factory string {factory!r}: {_faiss_reason(exc)}"
            ) from None
        self._configure_build(index)
        n_train = 0
        if not index.is_trained:
            n_train = self._train(index, data, factory)
        self.index_ = index
        self.kind_ = kind
        self.factory_ = factory
        self.dim_ = int(dim)
        ivf = faiss.try_extract_index_ivf(index)
        self.nlist_ = int(ivf.nlist) if ivf is not None else None
        self.n_train_ = int(n_train)
        self.paths_: list[str] | None = [str(p) for p in paths] if paths is not None else None
        self.labels_: np.ndarray | None = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.classes_ = list(classes) if classes is not None else None
        self.__dict__.pop("_row_of_path", None)  # archive_row()'s lookup of a previous fit
        for start in range(0, n, ADD_BLOCK):
            block = _as_matrix(data[start:start + ADD_BLOCK], "database vectors", offset=start)
            index.add(self._prepare(block, "database vectors", offset=start))
        self.build_seconds_ = time.perf_counter() - t0
        return self

    def add(self, vectors: Any, *, paths: Sequence[str] | None = None,
            labels: Sequence[int] | None = None) -> "SearchIndex":
        """Append ``vectors`` to a fitted index (no retraining); rows get the next ids.

        ``paths`` and ``labels`` must be given exactly when the index keeps them.
        """
        self._check_fitted()
        x = _as_matrix(vectors, "vectors to add")
        n = x.shape[0]
        if x.shape[1] != self.dim_:
            raise SearchIndexError(f"vectors to add have {x.shape[1]} dimensions but the index holds "
                                   f"{self.dim_}-dimensional vectors")
        for name, values, have in (("paths", paths, self.paths_), ("labels", labels, self.labels_)):
            if (values is None) != (have is None):
                raise SearchIndexError(f"this index {'keeps' if have is not None else 'has no'} {name}; "
                                       f"pass them with the vectors to add" if have is not None else
                                       f"this index has no {name}; add vectors without them")
            if values is not None and len(values) != n:
                raise SearchIndexError(f"{len(values)} {name} for {n} vectors")
        if n:
            self.index_.add(self._prepare(x, "vectors to add"))
        if paths is not None:
            self.paths_ = [*(self.paths_ or []), *map(str, paths)]
            self.__dict__.pop("_row_of_path", None)  # the lookup of archive_row() is stale
        if labels is not None:
            self.labels_ = np.concatenate([self.labels_, np.asarray(labels, dtype=np.int64)])
        return self

    def _configure_build(self, index: Any) -> None:
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.seed = int(self.seed)
            # the default sample holds TRAIN_PER_LIST vectors per list: enough to partition
            # the space (the lists need not be optimal centroids), and FAISS need not warn
            ivf.cp.min_points_per_centroid = min(int(ivf.cp.min_points_per_centroid), TRAIN_PER_LIST)
            pq = getattr(faiss.downcast_index(ivf), "pq", None)
            if pq is not None:
                pq.cp.seed = int(self.seed)
                # each of the M sub-quantiser k-means (256 centroids) sees at most
                # 64 x 256 = 16,384 residuals: minutes less at 1280-d, and the exact
                # re-ranking of 'ivf-pq' absorbs the coarser codes
                pq.cp.max_points_per_centroid = PQ_TRAIN_PER_CENTROID
        hnsw = _hnsw_of(index)
        if hnsw is not None:
            hnsw.efConstruction = int(self.ef_construction)

    def _train(self, index: Any, x: np.ndarray, factory: str) -> int:
        n = x.shape[0]
        ivf = _faiss().try_extract_index_ivf(index)
        nlist = int(ivf.nlist) if ivf is not None else 1
        cap = self.train_size if self.train_size is not None else max(TRAIN_PER_LIST * nlist, 65536)
        need = max(nlist, 256 if "PQ" in factory.upper() else 1)
        if n < need:
            raise SearchIndexError(
                f"index {factory!r} needs at least {need} vectors to train, got {n}; "
                f"use kind='exact' or fewer lists (nlist)"
            )
        if n > cap:
            rng = np.random.default_rng(self.seed)
            rows = np.sort(rng.choice(n, size=int(cap), replace=False))
            sample = _as_matrix(x[rows], "training vectors")
        else:
            sample = _as_matrix(x, "training vectors")
        self._prepare(sample, "training vectors")
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise SearchIndexError(f"cannot train index {factory!r} on {len(sample)} vectors: "
                                   f"{_faiss_reason(exc)}") from None
        return int(len(sample))

    # ------------------------------------------------------------------ searching
    @property
    def ntotal(self) -> int:
        """Vectors in the index (0 before :meth:`fit`)."""
        index = getattr(self, "index_", None)
        return int(index.ntotal) if index is not None else 0

    def __len__(self) -> int:
        return self.ntotal

    def _check_fitted(self) -> None:
        if getattr(self, "index_", None) is None:
            raise SearchIndexError("the search index is empty: fit it on database vectors first")

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        ivf = faiss.try_extract_index_ivf(self.index_)
        if ivf is not None:
            ivf.nprobe = int(min(self.nprobe, ivf.nlist))
            coarse = faiss.downcast_index(ivf.quantizer)
            if hasattr(coarse, "hnsw"):
                coarse.hnsw.efSearch = int(max(QUANTIZER_EF_SEARCH, 2 * ivf.nprobe))
        hnsw = _hnsw_of(self.index_)
        if hnsw is not None:
            hnsw.efSearch = int(self.ef_search)
        refine = faiss.downcast_index(self.index_)
        if hasattr(refine, "k_factor"):
            refine.k_factor = float(self.refine_factor)

    def check_k(self, k: int) -> None:
        """Refuse an empty index and a ``k`` outside ``1..ntotal`` (:class:`SearchIndexError`)."""
        self._check_fitted()
        if self.ntotal == 0:
            raise SearchIndexError("the search index is empty (0 vectors): add database vectors before searching")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SearchIndexError(f"k must be a positive integer, got {k!r}")
        if k > self.ntotal:
            raise SearchIndexError(f"k={int(k)} is larger than the database ({self.ntotal} vectors); "
                                   f"ask for k <= {self.ntotal}")

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest database rows of each query.

        Args:
            queries: (nq, dim) or (dim,) vectors, in the space the index was fitted in.
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``(distances, indices)``, both (nq, k), nearest first: distances (float32) in the
            metric's units (see module docstring), row indices (int64) into the database. An
            approximate index that finds fewer than ``k`` neighbours pads with index -1 and
            distance ``inf``.
        """
        self.check_k(k)
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim_:
            raise SearchIndexError(f"queries have {q.shape[1]} dimensions but the index holds "
                                   f"{self.dim_}-dimensional vectors")
        self._prepare(q, "queries")
        self._apply_search_params()
        sq, idx = self.index_.search(q, int(k))
        missing = idx < 0
        sq = np.maximum(sq, 0.0)
        dist = sq * 0.5 if self.metric == "cosine" else np.sqrt(sq)
        dist = dist.astype(np.float32, copy=False)
        dist[missing] = np.inf
        return dist, idx.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ describing
    def index_bytes(self) -> int:
        """Size of the serialised FAISS index in bytes (its memory footprint, to a few %)."""
        self._check_fitted()
        return int(_faiss().serialize_index(self.index_).nbytes)

    def describe(self) -> dict[str, Any]:
        """What ``index.json`` records (without the row paths and labels)."""
        self._check_fitted()
        import faiss

        return {
            "format": FORMAT_VERSION,
            "kind": self.kind_,
            "factory": self.factory_,
            "metric": self.metric,
            "dim": self.dim_,
            "ntotal": self.ntotal,
            "nlist": self.nlist_,
            "n_train": self.n_train_,
            "params": self.get_params(),
            "faiss_version": faiss.__version__,
            "meta": self.meta,
        }

    def __repr__(self) -> str:
        if getattr(self, "index_", None) is None:
            return f"SearchIndex(kind={self.kind!r}, metric={self.metric!r})"
        return f"SearchIndex({self.factory_!r}, metric={self.metric!r}, dim={self.dim_}, ntotal={self.ntotal})"

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` into ``directory`` atomically.

        The files are written into a temporary sibling folder that is then renamed to
        ``directory``; an existing index folder there is replaced, any other non-empty
        folder is refused.
        """
        self._check_fitted()
        out = Path(directory)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX_JSON).is_file())):
            raise SearchIndexError(f"{out} exists and is not a search index folder; choose another output")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            _faiss().write_index(self.index_, str(tmp / INDEX_FILE))
            doc = self.describe()
            doc["paths"] = self.paths_
            doc["labels"] = [int(v) for v in self.labels_] if self.labels_ is not None else None
            doc["classes"] = self.classes_
            atomic_write_json(tmp / INDEX_JSON, doc)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(out, old)
            os.replace(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, directory: str | Path) -> "SearchIndex":
        """Read an index folder written by :meth:`save`."""
        d = Path(directory)
        try:
            doc = json.loads((d / INDEX_JSON).read_text())
        except FileNotFoundError:
            raise SearchIndexError(f"no search index at {d} (missing {INDEX_JSON})") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise SearchIndexError(f"search index {d} has an unreadable {INDEX_JSON}: {first_line(exc)}") from None
        if doc.get("format") != FORMAT_VERSION:
            raise SearchIndexError(f"search index {d} has format {doc.get('format')}, expected {FORMAT_VERSION}")
        try:
            index = _faiss().read_index(str(d / INDEX_FILE))
        except RuntimeError as exc:
            raise SearchIndexError(f"search index {d}: cannot read {INDEX_FILE}: {_faiss_reason(exc)}") from None
        if int(index.ntotal) != int(doc["ntotal"]) or int(index.d) != int(doc["dim"]):
            raise SearchIndexError(
                f"search index {d}: {INDEX_FILE} holds {index.ntotal} x {index.d} vectors but {INDEX_JSON} "
                f"says {doc['ntotal']} x {doc['dim']}; the folder is inconsistent, rebuild it"
            )
        params = dict(doc.get("params") or {})
        self = cls(**params, meta=doc.get("meta") or {})
        self.index_ = index
        self.kind_ = doc["kind"]
        self.factory_ = doc["factory"]
        self.dim_ = int(doc["dim"])
        self.nlist_ = doc.get("nlist")
        self.n_train_ = int(doc.get("n_train") or 0)
        self.build_seconds_ = float("nan")
        self.paths_ = list(doc["paths"]) if doc.get("paths") is not None else None
        self.labels_ = np.asarray(doc["labels"], dtype=np.int64) if doc.get("labels") is not None else None
        self.classes_ = list(doc["classes"]) if doc.get("classes") is not None else None
        for name, values in (("paths", self.paths_), ("labels", self.labels_)):
            if values is not None and len(values) != self.ntotal:
                raise SearchIndexError(f"search index {d}: {len(values)} {name} for {self.ntotal} vectors")
        return self


def _hnsw_of(index: Any) -> Any | None:
    """The ``faiss.HNSW`` graph inside ``index`` (directly or under a refine wrapper), if any."""
    faiss = _faiss()
    idx = faiss.downcast_index(index)
    for _ in range(3):
        if hasattr(idx, "hnsw"):
            return idx.hnsw
        base = getattr(idx, "base_index", None)
        if base is None:
            return None
        idx = faiss.downcast_index(base)
    return None


def _faiss_reason(exc: BaseException) -> str:
    """The useful part of a FAISS C++ exception message (after 'Error: ')."""
    text = " ".join(str(exc).split())
    for marker in ("Error: '", "Error: "):
        if marker in text:
            text = text.split(marker, 1)[1].rstrip("'")
            break
    return text[:200]


def build_index_from_store(store_dir: str | Path, kind: str = "auto", metric: str = "cosine",
                           **settings: Any) -> SearchIndex:
    """A :class:`SearchIndex` over the valid rows of a complete feature store.

    The index's ``meta`` records the store's identity (backbone, weights source and digest,
    preprocessing, RGB bands), its folder and dataset (name, root, classes, item digest), so
    that queries can later be embedded by the same extractor; ``paths``, ``labels`` and
    ``classes`` come from the store. ``settings`` go to :class:`SearchIndex`.
    """
    from landlens.features.store import FeatureStore

    store = FeatureStore(store_dir)
    fs = store.load()
    valid = fs.only_valid()
    meta = fs.meta
    if len(valid) == 0:
        raise SearchIndexError(f"feature store {store.root} holds no valid feature rows; nothing to index")
    index_meta = {
        "feature_store": str(store.root.resolve()),
        "identity": meta.get("identity", {}),
        "backbone": meta.get("backbone", {}),
        "dataset": {k: meta.get("dataset", {}).get(k) for k in ("name", "root", "classes", "n_items", "items_sha256")},
        "n_skipped_rows": int(len(fs) - len(valid)),
    }
    index = SearchIndex(kind, metric, meta=index_meta, **settings)
    return index.fit(np.asarray(valid.features, dtype=np.float32), paths=valid.paths, labels=valid.labels,
                     classes=valid.classes)


# --------------------------------------------------------------------------- search by example image


@dataclass
class Hit:
    """One search result: database row, distance and what the row is."""

    rank: int
    row: int
    distance: float
    path: str | None
    label: int | None
    class_name: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "row": self.row, "distance": self.distance, "path": self.path,
                "label": self.label, "class": self.class_name}


@dataclass
class QueryResult:
    """The hits of one query image, nearest first.

    ``query_class`` is the query's class when known (the query is an image of the indexed
    archive, or the caller named it); a hit is relevant when its class equals it.
    """

    query: str
    query_class: str | None
    hits: list[Hit] = field(default_factory=list)
    archive_row: int | None = None

    def relevant(self) -> list[bool | None]:
        """Per hit: same class as the query (``None`` when the query's class is unknown)."""
        if self.query_class is None:
            return [None] * len(self.hits)
        return [h.class_name == self.query_class for h in self.hits]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "query_class": self.query_class, "archive_row": self.archive_row,
                "hits": [{**h.to_dict(), "relevant": r} for h, r in zip(self.hits, self.relevant())]}


def _identity(index: SearchIndex) -> dict[str, Any]:
    ident = index.meta.get("identity")
    if not ident or "weights_digest" not in ident:
        raise SearchIndexError(
            "this index records no feature extractor (it was not built from a feature store); "
            "search it with vectors, not images"
        )
    return ident


def _weights_argument(recorded: dict[str, Any]) -> str:
    """The ``create_backbone`` weights argument that reloads recorded weights."""
    source, ref = recorded.get("source"), str(recorded.get("ref") or "")
    if source == "package":
        return "package"
    if source == "builtin":  # hand-crafted descriptors: nothing to load
        return "auto"
    if source == "run":  # a trained run directory: its location, pinned to the recorded digest
        from landlens.models.classifier import run_weights_argument

        return run_weights_argument(ref, recorded.get("digest"))
    if source == "file":
        return ref
    if source == "hub":
        family, _, name = ref.partition("/")  # 'timm/arch.tag' or 'torchvision/arch.WEIGHTS'
        return "hub:" + (name.split(".", 1)[1] if family == "torchvision" and "." in name else name)
    raise SearchIndexError(
        f"the index's features come from a backbone with weights {source!r} ({ref}); they cannot be "
        f"rebuilt to embed queries: extract the features with saved weights (a checkpoint file, "
        f"packaged or hub weights) and index them again"
    )


def check_backbone(index: SearchIndex, backbone: Any) -> None:
    """Refuse a backbone whose features are not those the index holds: another architecture,
    other weights (digest), other preprocessing or another feature length."""
    ident = _identity(index)
    recorded_w = index.meta.get("backbone", {}).get("weights", {})
    got = {"backbone": backbone.name, "weights_digest": backbone.weights.digest,
           "preprocessing": backbone.preprocessing.to_dict(), "num_features": backbone.num_features}
    want = {"backbone": ident.get("backbone"), "weights_digest": ident.get("weights_digest"),
            "preprocessing": ident.get("preprocessing"), "num_features": index.dim_}
    diffs = [key for key in want if want[key] != got[key]]
    if diffs:
        def show(d: dict[str, Any], w: dict[str, Any] | None) -> str:
            where = f" ({w.get('source')}: {w.get('ref')})" if w else ""
            parts = {"backbone": f"{d['backbone']}{where}",
                     "weights_digest": f"weights digest {str(d['weights_digest'])[:16]}",
                     "preprocessing": f"preprocessing {json.dumps(d['preprocessing'], sort_keys=True)}",
                     "num_features": f"{d['num_features']}-d features"}
            return ", ".join(parts[k] for k in ["backbone", *[k for k in diffs if k != "backbone"]])

        raise SearchIndexError(f"index was built with {show(want, recorded_w)}; this backbone gives "
                               f"{show(got, backbone.weights.to_dict())}")


def backbone_for_index(index: SearchIndex, weights: str | None = None) -> Any:
    """Rebuild the feature extractor recorded in an index built by :func:`build_index_from_store`.

    The weights are reloaded from where the store says they came from (the packaged file, the
    checkpoint path, or the hub tag), or from ``weights`` (any ``create_backbone`` weights
    argument, e.g. a checkpoint that moved); the recorded preprocessing is applied, and the
    result must have the recorded weights digest (:func:`check_backbone`).
    """
    from landlens.models.preprocessing import Preprocessing
    from landlens.models.registry import create_backbone

    ident = _identity(index)
    recorded = index.meta.get("backbone", {}).get("weights", {})
    arg = weights if weights is not None else _weights_argument(recorded)
    try:
        pre = Preprocessing.from_dict(ident["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SearchIndexError(f"the index records an unusable preprocessing: {first_line(exc)}") from None
    try:
        bb = create_backbone(ident["backbone"], arg, preprocessing=pre)
    except LandlensError as exc:
        raise type(exc)(f"{exc} (rebuilding the backbone of the index, whose weights came from "
                        f"{recorded.get('source')}: {recorded.get('ref')}; pass other weights to point at them)") from None
    check_backbone(index, bb)
    return bb


def decode_queries(index: SearchIndex, paths: Sequence[str | Path], *, max_pixels: int | None = None) -> list[Any]:
    """Decode query images to RGB exactly as the indexed features were decoded (same JPEG draft
    size and band choice), ready for the backbone's preprocessing.

    Raises:
        ImageReadError: a query that is missing or not a readable image, or larger than
            ``max_pixels`` (default :data:`~landlens.data.io.DEFAULT_MAX_PIXELS`), naming the file.
    """
    from landlens.data.io import DEFAULT_MAX_PIXELS
    from landlens.models.preprocessing import Preprocessing, decode_image

    ident = _identity(index)
    pre = Preprocessing.from_dict(ident["preprocessing"])
    bands = ident.get("rgb_bands")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    return [decode_image(p, pre, rgb_bands=bands, max_pixels=limit) for p in paths]


def _index_features(index: SearchIndex) -> Any:
    """The index's feature store, loaded, with exactly the index's rows (else one clear error)."""
    from landlens.features.store import FeatureStore

    store_dir = (index.meta or {}).get("feature_store")
    if not store_dir or not Path(store_dir).is_dir():
        raise SearchIndexError(f"re-ranking needs the index's feature store, which is not at {store_dir!r}")
    fs = FeatureStore(store_dir).load().only_valid()
    if len(fs) != index.ntotal or (index.paths_ is not None and list(fs.paths) != list(index.paths_)):
        raise SearchIndexError(f"the feature store {store_dir} no longer matches the index's rows; rebuild the index")
    return fs


def _rerank_unsupervised(index: SearchIndex, feats: np.ndarray, k: int, spec: str,
                         query_rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of each query after an unsupervised re-ranking of the whole archive
    (:mod:`landlens.retrieval.rerank`, fitted on the index's features; no labels)."""
    from landlens.retrieval.rerank import make_reranker

    if index.metric != "cosine":
        raise SearchIndexError(f"--rerank ranks by cosine similarity; this index uses {index.metric}")
    rr = make_reranker(spec).fit(_index_features(index).features)
    return rr.rerank(feats, k, query_rows=np.asarray(query_rows, dtype=np.int64))


def _rerank_with_matcher(index: SearchIndex, feats: np.ndarray, k: int, matcher: str | Path,
                         shortlist: int) -> tuple[np.ndarray, np.ndarray]:
    """The index's ``shortlist`` nearest rows of each query, re-ranked by a matching discriminator."""
    import torch

    from landlens.retrieval.distances import get_distance

    fs = _index_features(index)
    ident = (fs.meta or {}).get("identity") or {}
    identity = {key: ident[key] for key in ("backbone", "weights_digest", "preprocessing") if ident.get(key) is not None}
    identity["dim"] = int(fs.features.shape[1])
    dist_fn = get_distance("learned", model=matcher, features=identity)
    n = min(shortlist, index.ntotal)
    _, cand = index.search(feats, n)
    out_d = np.full((len(feats), k), np.inf, dtype=np.float32)
    out_r = np.full((len(feats), k), -1, dtype=np.int64)
    for qi in range(len(feats)):
        rows = cand[qi][cand[qi] >= 0]
        if len(rows) == 0:
            continue
        d = dist_fn(torch.from_numpy(np.ascontiguousarray(feats[qi:qi + 1], dtype=np.float32)),
                    torch.from_numpy(np.ascontiguousarray(fs.features[rows], dtype=np.float32)))[0].numpy()
        order = np.argsort(d, kind="stable")[:k]
        out_d[qi, :len(order)] = d[order]
        out_r[qi, :len(order)] = rows[order]
    return out_d, out_r


def embed_images(backbone: Any, images: Sequence[Any], batch_size: int = 32,
                 forward: Any = None) -> np.ndarray:
    """Backbone features (n, num_features) of RGB PIL images, under the backbone's preprocessing.

    ``forward``: a prepared graph of the backbone
    (:func:`landlens.features.extract.optimize_for_inference`) to run instead of eager mode; it
    gets channels-last batches, the layout it was prepared for.
    """
    import torch

    from landlens.models.preprocessing import preprocess_images

    model = backbone.eval() if forward is None else forward
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = preprocess_images(list(images[s:s + batch_size]), backbone.preprocessing)
            if forward is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().flatten(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.num_features), np.float32)


def archive_root(index: SearchIndex) -> Path | None:
    """The folder the indexed paths are relative to (the feature store's dataset root)."""
    root = index.meta.get("dataset", {}).get("root")
    return Path(root) if root else None


def archive_row(index: SearchIndex, path: str | Path) -> int | None:
    """The database row of ``path`` when it is an image of the indexed archive, else ``None``."""
    root = archive_root(index)
    if root is None or not index.paths_:
        return None
    try:
        rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return None
    rows = getattr(index, "_row_of_path", None)
    if rows is None:
        rows = {p: i for i, p in enumerate(index.paths_)}
        index._row_of_path = rows  # type: ignore[attr-defined]
    return rows.get(rel)


def search_images(index: SearchIndex, backbone: Any, paths: Sequence[str | Path], k: int = 10, *,
                  query_classes: Sequence[str | None] | None = None,
                  images: Sequence[Any] | None = None, matcher: str | Path | None = None,
                  shortlist: int = 100, rerank: str | None = None) -> list[QueryResult]:
    """Search the index with query images: decode, embed with ``backbone``, find the ``k``
    nearest database rows of each.

    Args:
        index: an index built by :func:`build_index_from_store`.
        backbone: the index's feature extractor (:func:`backbone_for_index`); checked.
        paths: query image files.
        k: hits per query.
        query_classes: the class of each query (``None`` entries: unknown), for queries from
            outside the archive; a query inside the archive takes its recorded class.
        images: the decoded queries if the caller already has them (:func:`decode_queries`).
        matcher: a trained matching discriminator (``landlens matching train-dml``) on this index's
            features: the index's ``shortlist`` nearest rows are re-ranked by match probability
            (distance ``1 - P(match)``); it refuses features other than those it was trained on.
        shortlist: rows re-ranked per query with ``matcher`` (at least ``k``).
        rerank: an unsupervised re-ranking spec (:func:`landlens.retrieval.rerank.make_reranker`,
            e.g. ``"aqe+diffusion"``): fitted on the index's features (no labels), it ranks the
            whole archive for each query (a query that is an archive image uses its own node).
    """
    check_backbone(index, backbone)
    index.check_k(k)
    if query_classes is not None:
        if len(query_classes) != len(paths):
            raise SearchIndexError(f"{len(query_classes)} query classes for {len(paths)} queries")
        known = set(index.classes_ or [])
        for c in query_classes:
            if c is not None and c not in known:
                raise SearchIndexError(f"query class {c!r} is not a class of this index "
                                       f"({', '.join(sorted(known)) or 'it has no classes'})")
    imgs = list(images) if images is not None else decode_queries(index, paths)
    feats = embed_images(backbone, imgs)
    own = [archive_row(index, p) for p in paths]
    dist, rows = search_features(index, feats, k, matcher=matcher, shortlist=shortlist, rerank=rerank,
                                 query_rows=[-1 if r is None else r for r in own])
    results = []
    for qi, p in enumerate(paths):
        row = own[qi]
        qclass = query_classes[qi] if query_classes is not None else None
        if qclass is None and row is not None:
            qclass = row_class(index, row)
        results.append(QueryResult(str(p), qclass, index_hits(index, dist[qi], rows[qi]), row))
    return results


def search_features(index: SearchIndex, feats: np.ndarray, k: int, *, matcher: str | Path | None = None,
                    shortlist: int = 100, rerank: str | None = None,
                    query_rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, rows)``, both ``(nq, k)``, of query features: the index's nearest rows, or
    the discriminator's re-ranking of a shortlist (``matcher``), or an unsupervised re-ranking
    of the whole archive (``rerank``; ``query_rows``: each query's own archive row or -1)."""
    if matcher is not None and rerank is not None:
        raise SearchIndexError("a matching discriminator and an unsupervised re-ranking cannot be combined; choose one")
    if matcher is not None:
        return _rerank_with_matcher(index, feats, k, matcher, max(int(shortlist), k))
    if rerank is not None:
        rows = [-1] * len(feats) if query_rows is None else list(query_rows)
        return _rerank_unsupervised(index, feats, k, rerank, rows)
    return index.search(feats, k)


def index_hits(index: SearchIndex, dist: np.ndarray, rows: np.ndarray) -> list[Hit]:
    """One query's ranked :class:`Hit` list from its row of distances and index rows."""
    return [Hit(rank=r + 1, row=int(i), distance=float(d),
                path=index.paths_[i] if index.paths_ is not None and i >= 0 else None,
                label=int(index.labels_[i]) if index.labels_ is not None and i >= 0 else None,
                class_name=row_class(index, int(i)) if i >= 0 else None)
            for r, (d, i) in enumerate(zip(dist, rows))]


def row_class(index: SearchIndex, row: int) -> str | None:
    """The class name of an index row (``None`` when the index holds no labels)."""
    if index.labels_ is None:
        return None
    label = int(index.labels_[row])
    classes = index.classes_ or []
    return classes[label] if 0 <= label < len(classes) else str(label)


__all__ = [
    "AUTO_EXACT_MAX",
    "AUTO_LARGE_KIND",
    "KINDS",
    "METRICS",
    "Hit",
    "QueryResult",
    "SearchIndex",
    "SearchIndexError",
    "archive_root",
    "archive_row",
    "backbone_for_index",
    "build_index_from_store",
    "check_backbone",
    "decode_queries",
    "default_nlist",
    "default_pq_m",
    "embed_images",
    "index_hits",
    "row_class",
    "search_features",
    "search_images",
]
