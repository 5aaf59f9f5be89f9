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
``ivf-pq-disk`` IVF-PQ with an OPQ rotation whose inverted lists live in a file that is
               memory-mapped, not loaded (:mod:`landlens.retrieval.ondisk`,
               ``"OPQ{m},IVF{nlist}_HNSW32,PQ{m}x8np"``): RAM holds the quantisers and the
               pages of the lists a query visits. Built block by block from the vectors
               (a memory map is never read whole); the ``refine_factor * k`` best PQ
               candidates are re-ranked exactly when the vectors are attached
               (:meth:`SearchIndex.use_vectors`; an archive attaches its memory-mapped
               ``vectors.npy``). Not extended in place (:meth:`SearchIndex.add`).
``auto``       ``exact`` below :data:`AUTO_EXACT_MAX` vectors; ``ivf-pq-disk`` where
               IVF-Flat's copy of the vectors would take more than :data:`AUTO_RAM_SHARE`
               of the machine's RAM; else :data:`AUTO_LARGE_KIND` with the settings chosen
               by ``benchmarks/search_scale.py``.
other          any FAISS index-factory string, e.g. ``"IVF4096,PQ64"`` or ``"HNSW32,Flat"``.
=============  ==========================================================================

The build and search settings (``ef_construction``, ``ef_search``, ``nprobe``,
``refine_factor``) apply to every index holding the structure they tune, factory-built
ones included; change them on a fitted index and the next :meth:`SearchIndex.search` uses them.

Training (k-means for IVF, sub-quantisers for PQ) uses a seeded random sample of at most
``train_size`` database vectors. HNSW graphs are built with several threads and are not
bit-for-bit reproducible between runs; the other kinds are, for a given FAISS build.

An index built from a feature store (:func:`build_index_from_store`) records the store's
extractor in its ``meta``, so queries can be embedded as the database was
(:mod:`landlens.retrieval.extractor`). The persistent, searchable object users hold is the
:class:`~landlens.retrieval.archive.Archive`, which keeps a :class:`SearchIndex` inside.

An index is saved as a folder holding ``index.faiss`` (``faiss.write_index``) and
``index.json`` (kind, factory string, metric, dimension, size, settings, the caller's
``meta`` such as the identity of the feature store it indexes, and the rows' ``paths``,
``labels`` and ``classes``), written into a temporary folder and renamed into place; an
``ivf-pq-disk`` index adds its list file ``lists.ivfdata`` and ``disk_index.json`` (hard links
to the build's files where the file system allows).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from landlens.errors import LandlensError, first_line
from landlens.atomic import atomic_write_json
from landlens.retrieval.faisskit import METRICS, default_pq_m, faiss_module, set_ivf_probes
from landlens.retrieval.ondisk import LISTS_FILE, META_FILE, DiskIndex, DiskIndexSettings, build_disk_index

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
INDEX_JSON = "index.json"

KINDS = ("auto", "exact", "hnsw", "ivf-flat", "ivf-pq", "ivf-pq-disk")
DISK_KIND = "ivf-pq-disk"

AUTO_EXACT_MAX = 50_000
"""``kind='auto'`` searches exactly below this many database vectors."""

AUTO_LARGE_KIND = "ivf-flat"
"""What ``kind='auto'`` builds for larger databases. In ``benchmarks/results/search_scale.md``
(1,000,000 x 1280, 2 cores) ``ivf-flat`` with the default ``nprobe`` reached recall@10 0.954
at 2.2 ms per query, 227x faster than exact search, and built in 2 minutes; HNSW was faster
per query but builds about 2,000 vectors/s at 1280-d (8+ minutes per million), and
``ivf-pq`` with 64-byte codes levelled off at recall 0.93."""

AUTO_RAM_SHARE = 0.25
"""``kind='auto'`` builds ``ivf-pq-disk`` once ``n * dim * 4`` bytes (IVF-Flat's copy of the
vectors) exceed this share of the machine's RAM (:func:`ram_bytes`). A quarter, not all: the
build holds the vectors twice (the caller's array and the index's copy), and an archive's
catalog and the page cache of its memory-mapped vectors need the rest (an archive of 1,000,000
512-d vectors, 2 GB of vectors, peaked at 10.1 GB while compacting;
``benchmarks/results/segment_archive.md``). On a 24 GiB machine the switch comes at about
1.26 million 1280-d vectors."""

DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 16
DEFAULT_REFINE_FACTOR = 10
HNSW_QUANTIZER_MIN_LIST = 1024
"""IVF kinds with at least this many lists search their centroids with an HNSW graph."""
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


def ram_bytes() -> int:
    """Physical memory of this machine in bytes (what ``kind='auto'`` sizes against)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def auto_kind(n: int, dim: int | None = None) -> str:
    """The kind ``kind='auto'`` builds for ``n`` vectors of ``dim`` dimensions (module docstring)."""
    if n < AUTO_EXACT_MAX:
        return "exact"
    if dim is not None and n * dim * 4 > AUTO_RAM_SHARE * ram_bytes():
        return DISK_KIND
    return AUTO_LARGE_KIND


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about ``4 sqrt(n)``, at most ``n / 39`` (at least 1)."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // MIN_TRAIN_PER_LIST)))


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
            faiss_module().normalize_L2(x)
        return x

    def resolve_kind(self, n: int, dim: int | None = None) -> str:
        """The kind :meth:`fit` builds for ``n`` vectors of ``dim`` dimensions (``'auto'``
        resolved by :func:`auto_kind`; ``'factory'`` for a FAISS factory string)."""
        kind = self.kind.strip().lower() if isinstance(self.kind, str) else self.kind
        if kind == "auto":
            return auto_kind(n, dim)
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
        kind = self.resolve_kind(n, dim)
        if kind == "exact":
            return "Flat"
        if kind == DISK_KIND:
            try:
                return self.disk_settings().resolved(n, dim).factory(dim)
            except LandlensError as exc:
                raise SearchIndexError(str(exc)) from None
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

    def disk_settings(self) -> DiskIndexSettings:
        """The settings of an ``ivf-pq-disk`` build from this index's own."""
        return DiskIndexSettings(metric=self.metric, nlist=self.nlist, pq_m=self.pq_m, train_size=self.train_size,
                                 nprobe=int(self.nprobe), refine_factor=int(self.refine_factor), seed=int(self.seed))

    # ------------------------------------------------------------------ learning
    def fit(self, vectors: Any, *, paths: Sequence[str] | None = None, labels: Sequence[int] | None = None,
            classes: Sequence[str] | None = None, scratch: str | os.PathLike[str] | None = None) -> "SearchIndex":
        """Build a new index on ``vectors`` (n, dim): train where the kind needs it, then add.

        ``vectors`` may be any array-like, a memory map included: it is read in blocks of
        :data:`ADD_BLOCK` rows, so the only full copy is the one the index keeps. ``paths``
        and ``labels`` (one per row) and ``classes`` (label names) are optional and kept with
        the index, so hits can be reported by name. An ``ivf-pq-disk`` index is built in a new
        folder under ``scratch`` (default: the system's temporary folder; best on the file
        system :meth:`save` writes to, so saving hard-links rather than copies), deleted with
        the index object; ``vectors`` are attached for its exact re-ranking.
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
        faiss = faiss_module()
        factory = self.factory_string(n, dim)
        kind = self.resolve_kind(n, dim)
        self.disk_: DiskIndex | None = None
        if kind == DISK_KIND:
            return self._fit_disk(data, factory, paths, labels, classes, scratch)
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
        self._keep_rows(paths, labels, classes)
        for start in range(0, n, ADD_BLOCK):
            block = _as_matrix(data[start:start + ADD_BLOCK], "database vectors", offset=start)
            index.add(self._prepare(block, "database vectors", offset=start))
        self.build_seconds_ = time.perf_counter() - t0
        return self

    def _keep_rows(self, paths: Sequence[str] | None, labels: Sequence[int] | None,
                   classes: Sequence[str] | None) -> None:
        self.paths_ = [str(p) for p in paths] if paths is not None else None
        self.labels_ = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.classes_ = list(classes) if classes is not None else None
        self.__dict__.pop("_row_of_path", None)  # archive_row()'s lookup of a previous fit

    def _fit_disk(self, data: Any, factory: str, paths: Sequence[str] | None, labels: Sequence[int] | None,
                  classes: Sequence[str] | None, scratch: str | os.PathLike[str] | None) -> "SearchIndex":
        n, dim = data.shape
        for start in range(0, n, ADD_BLOCK):  # the checks of the in-RAM kinds, before minutes of training
            self._prepare(_as_matrix(data[start:start + ADD_BLOCK], "database vectors", offset=start),
                          "database vectors", offset=start)
        t0 = time.perf_counter()
        if scratch is not None:
            Path(scratch).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".disk-index-", suffix=".tmp", dir=scratch))
        weakref.finalize(self, shutil.rmtree, str(folder), True)  # the build lives as long as this object
        try:
            disk = build_disk_index(lambda a, b: np.asarray(data[a:b]), n, dim, folder / "index",
                                    self.disk_settings())
        except LandlensError as exc:
            raise SearchIndexError(str(exc)) from None
        disk.use_vectors(data)
        self.disk_ = disk
        self.index_ = disk.index_
        self.kind_, self.factory_, self.dim_ = DISK_KIND, factory, int(dim)
        self.nlist_ = int(disk.settings.nlist or 0)
        self.n_train_ = int(disk.settings.train_size or 0)
        self._keep_rows(paths, labels, classes)
        self.build_seconds_ = time.perf_counter() - t0
        return self

    @property
    def _disk(self) -> DiskIndex | None:
        """The on-disk index of an ``ivf-pq-disk`` fit (``None`` for the other kinds, or unfitted)."""
        return getattr(self, "disk_", None)

    def use_vectors(self, vectors: Any) -> None:
        """Give an ``ivf-pq-disk`` index the database vectors (row i = row i of the index; a memory
        map is best) for the exact re-ranking of its shortlist; other kinds need none."""
        if self._disk is not None:
            self._disk.use_vectors(vectors)

    def add(self, vectors: Any, *, paths: Sequence[str] | None = None,
            labels: Sequence[int] | None = None) -> "SearchIndex":
        """Append ``vectors`` to a fitted index (no retraining); rows get the next ids.

        ``paths`` and ``labels`` must be given exactly when the index keeps them.
        """
        self._check_fitted()
        if self._disk is not None:
            raise SearchIndexError("an ivf-pq-disk index is not extended in place; build a new one (an archive "
                                   "adds a segment)")
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
        faiss = faiss_module()
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
        ivf = faiss_module().try_extract_index_ivf(index)
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
        faiss = faiss_module()
        set_ivf_probes(self.index_, self.nprobe)
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
        if self._disk is not None:
            self.disk_.nprobe, self.disk_.refine_factor = int(self.nprobe), int(self.refine_factor)
            return self.disk_.search(q, int(k))
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
        if self._disk is not None:
            return self.disk_.disk_bytes()
        return int(faiss_module().serialize_index(self.index_).nbytes)

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
            if self._disk is not None:
                for name in (INDEX_FILE, LISTS_FILE, META_FILE):
                    _link_or_copy(self.disk_.folder / name, tmp / name)
            else:
                faiss_module().write_index(self.index_, str(tmp / INDEX_FILE))
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
        disk = None
        try:
            if doc.get("kind") == DISK_KIND:
                disk = DiskIndex.open(d)
                index = disk.index_
            else:
                index = faiss_module().read_index(str(d / INDEX_FILE))
        except RuntimeError as exc:
            raise SearchIndexError(f"search index {d}: cannot read {INDEX_FILE}: {_faiss_reason(exc)}") from None
        except LandlensError as exc:
            raise SearchIndexError(f"search index {d}: {exc}") from None
        if int(index.ntotal) != int(doc["ntotal"]) or int(index.d) != int(doc["dim"]):
            raise SearchIndexError(
                f"search index {d}: {INDEX_FILE} holds {index.ntotal} x {index.d} vectors but {INDEX_JSON} "
                f"says {doc['ntotal']} x {doc['dim']}; the folder is inconsistent, rebuild it"
            )
        params = dict(doc.get("params") or {})
        self = cls(**params, meta=doc.get("meta") or {})
        self.index_ = index
        self.disk_ = disk
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


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no bytes copied), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _hnsw_of(index: Any) -> Any | None:
    """The ``faiss.HNSW`` graph inside ``index`` (directly or under a refine wrapper), if any."""
    faiss = faiss_module()
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


def build_index_from_store(store_dir: str | Path, kind: str = "auto", metric: str = "cosine", *,
                           scratch: str | os.PathLike[str] | None = None, **settings: Any) -> SearchIndex:
    """A :class:`SearchIndex` over the valid rows of a complete feature store.

    The index's ``meta`` records the store's identity (backbone, weights source and digest,
    preprocessing, RGB bands), its folder and dataset (name, root, classes, item digest), so
    that queries can later be embedded by the same extractor; ``paths``, ``labels`` and
    ``classes`` come from the store. ``settings`` go to :class:`SearchIndex`, ``scratch`` to
    :meth:`SearchIndex.fit`.
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
                     classes=valid.classes, scratch=scratch)


__all__ = [
    "AUTO_EXACT_MAX",
    "AUTO_LARGE_KIND",
    "AUTO_RAM_SHARE",
    "DISK_KIND",
    "KINDS",
    "METRICS",
    "SearchIndex",
    "SearchIndexError",
    "auto_kind",
    "build_index_from_store",
    "default_nlist",
    "default_pq_m",
    "faiss_module",
    "ram_bytes",
    "set_ivf_probes",
]
