"""Unsupervised re-ranking of retrieval results: alpha-QE (+ alpha-DBA), diffusion, k-reciprocal.

Every method here uses no label: it looks only at the database's features (the k-NN graph
of the archive) and at the query. The base similarity is the cosine, i.e. the dot product
of L2-normalised features (the features are normalised on entry, whatever they were).

============  ===============================================================================
spec          method
============  ===============================================================================
aqe           alpha-weighted query expansion, optionally with alpha database-side
              augmentation (Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with
              no human annotation", TPAMI 2018, Sec. 5): :class:`AlphaQE`
diffusion     diffusion on the mutual k-NN graph solved by conjugate gradient (Iscen, Tolias,
              Avrithis, Furon & Chum, "Efficient diffusion on region manifolds", CVPR 2017,
              Sec. 3-4): :class:`Diffusion`
kreciprocal   k-reciprocal encoding with the Jaccard distance (Zhong, Zheng, Cao & Li,
              "Re-ranking person re-identification with k-reciprocal encoding", CVPR 2017,
              Sec. 3): :class:`KReciprocal`
============  ===============================================================================

A re-ranker is an estimator in the scikit-learn style: the settings go to ``__init__``,
:meth:`Reranker.fit` learns from the database (attributes ending in ``_``), and then it is

- a distance for :func:`landlens.retrieval.metrics.evaluate_retrieval`: ``r(q_block, db)``
  returns ``(b, n)`` distances (smaller = closer) and checks that ``db`` is the database it
  was fitted on; :meth:`Reranker.bind` gives the per-block form that knows which database
  row each query is (what :func:`landlens.retrieval.evaluate.evaluate` uses);
- a search: :meth:`Reranker.rerank` returns the top-k ``(distances, indices)``.

:func:`make_reranker` builds one from a short spec such as ``"aqe:n=2,alpha=3"``,
``"diffusion:k=50,gamma=3,alpha=0.99"``, ``"kreciprocal:k1=20,k2=6,lambda=0.3"`` or a
combination ``"aqe+diffusion"`` (query expansion first, then the graph method on the
expanded query and, with ``dba``, the augmented database).

Queries that are database rows (the ``archive`` protocol, or searching by an archive
image): the query's own row is found by its exact feature bytes (or given as
``query_rows``). alpha-QE and alpha-DBA leave that row out of the neighbours they add (the
query already counts once); diffusion and k-reciprocal re-ranking use the query's own node
of the graph, as the methods do when the query belongs to the collection. Evaluation then
leaves the query's own row out of its ranking, as for any distance.

Cost: fitting builds the k-NN lists of the database by blocks of matrix products (never an
``n x n`` matrix: memory ``O(n k)`` plus one block); a query costs one similarity row to the
database plus, for diffusion, ``iters`` sparse products with the ``O(n k)``-edge graph, and,
for k-reciprocal, sparse set operations over its candidate lists.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import weakref
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from landlens.errors import ConfigError, LandlensError

#: Elements of a (rows x database) similarity block held at once while building k-NN lists.
BLOCK_ELEMENTS = 1 << 25
#: Candidate pairs processed at once by the k-reciprocal Jaccard distance.
PAIR_CHUNK = 1 << 22


# ------------------------------------------------------------------------------ helpers


def _as_matrix(x: Any, what: str) -> np.ndarray:
    """Float32, C-contiguous, 2-D numpy copy-free view of ``x`` (numpy array or tensor)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if a.ndim != 2:
        raise LandlensError(f"{what}: expected a 2-D feature matrix, got shape {a.shape}")
    return a


def _unit(a: np.ndarray) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero), float32 tensor."""
    t = torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)  # a read-only memmap is copied
    return torch.nn.functional.normalize(t, dim=1).contiguous()


def _row_digests(a: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in a]


def _matrix_digest(a: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(a.shape).encode())
    h.update(memoryview(a).cast("B"))
    return h.digest()


def knn_graph(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar *other* rows of every row of ``x`` by dot product.

    Computed by blocks of rows so that at most :data:`BLOCK_ELEMENTS` similarities are held
    at once (memory ``O(n k)``, never ``n x n``). Returns ``(similarities, indices)``, both
    ``(n, k)``, in decreasing similarity; ``k`` is capped at ``n - 1``.
    """
    n = x.shape[0]
    k = max(0, min(int(k), n - 1))
    sims = torch.empty((n, k), dtype=torch.float32)
    idx = torch.empty((n, k), dtype=torch.int64)
    if k == 0:
        return sims, idx
    rows = max(1, min(n, BLOCK_ELEMENTS // max(1, n)))
    with torch.no_grad():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            m = x[s:e] @ x.T
            m[torch.arange(e - s), torch.arange(s, e)] = -float("inf")  # not its own neighbour
            v, i = torch.topk(m, k, dim=1)
            sims[s:e], idx[s:e] = v, i
    return sims, idx


def _topk_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(0, min(int(k), s.shape[1]))
    return torch.topk(s, k, dim=1)


# ------------------------------------------------------------------------------ base class


class Reranker:
    """Base of the re-rankers: fitting, database checks, query rows, distances and top-k.

    Subclasses implement ``_fit(x)`` (``x`` the L2-normalised database, a float32 tensor)
    and ``_score(q, rows)`` (``q`` L2-normalised queries, ``rows`` the database row of each
    query or -1) returning ``(b, n)`` float32 distances.

    Attributes set by :meth:`fit`: ``database_`` (the normalised database), ``n_database_``,
    ``fit_seconds_``.
    """

    method: str = ""
    reference: str = ""
    symmetric = False  # not a BaseDistance: evaluation calls it once per query block

    # -------------------------------------------------------------- settings
    def params(self) -> dict[str, Any]:
        """The settings, as in the spec."""
        return {}

    @property
    def spec(self) -> str:
        """The canonical spec (every setting spelled out); :func:`make_reranker` reads it back."""
        p = self.params()
        if not p:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in p.items())

    @property
    def name(self) -> str:
        return self.spec

    def to_dict(self) -> dict[str, Any]:
        """How the re-ranker is recorded in a result file."""
        d: dict[str, Any] = {"spec": self.spec, "method": self.method, "params": self.params(),
                             "base_similarity": "cosine (dot product of L2-normalised features)",
                             "reference": self.reference}
        if hasattr(self, "n_database_"):
            d["database_size"] = self.n_database_
            d["fit_seconds"] = round(self.fit_seconds_, 4)
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # -------------------------------------------------------------- fitting
    def fit(self, database: np.ndarray | torch.Tensor) -> "Reranker":
        """Learn the graph / augmentation from the database features ``(n, D)``."""
        raw = _as_matrix(database, "re-ranking database")
        if raw.shape[0] < 2:
            raise LandlensError(f"re-ranking ({self.spec}) needs a database of at least 2 images, got {raw.shape[0]}")
        if not np.isfinite(raw.sum(dtype=np.float64)):
            raise LandlensError("the re-ranking database has NaN/inf features (unreadable images?)")
        t0 = time.perf_counter()
        self.database_ = _unit(raw)
        self.n_database_ = int(raw.shape[0])
        self.database_shape_ = tuple(raw.shape)
        self.database_digest_ = _matrix_digest(raw)
        self.row_digests_ = _row_digests(raw)
        self._row_of = {}
        for i, dg in enumerate(self.row_digests_):
            self._row_of.setdefault(dg, i)
        self._checked: Any = None
        self._fit(self.database_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _fit(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _require_fit(self) -> None:
        if not hasattr(self, "database_"):
            raise LandlensError(f"re-ranker {self.spec} is used before fit(database)")

    # -------------------------------------------------------------- queries
    def query_rows(self, queries: np.ndarray | torch.Tensor) -> np.ndarray:
        """The database row of each query whose features are byte-identical to one (else -1).

        Of identical database rows, the first is reported.
        """
        self._require_fit()
        a = _as_matrix(queries, "queries")
        return np.array([self._row_of.get(d, -1) for d in _row_digests(a)], dtype=np.int64)

    def _rows(self, raw: np.ndarray, query_rows: Any) -> np.ndarray:
        if isinstance(query_rows, str):
            if query_rows != "auto":
                raise ValueError(f"query_rows must be 'auto', None or row indices, got {query_rows!r}")
            return np.array([self._row_of.get(d, -1) for d in _row_digests(raw)], dtype=np.int64)
        if query_rows is None:
            return np.full(raw.shape[0], -1, dtype=np.int64)
        rows = np.asarray(query_rows, dtype=np.int64).reshape(-1)
        if rows.shape[0] != raw.shape[0] or bool((rows >= self.n_database_).any()):
            raise ValueError(f"query_rows needs one database row (or -1) per query: {rows.shape[0]} rows for "
                             f"{raw.shape[0]} queries, database of {self.n_database_}")
        return rows

    def distances(self, queries: np.ndarray | torch.Tensor, query_rows: Any = "auto") -> torch.Tensor:
        """Re-ranked distances ``(b, n)`` of the queries to every database item (smaller = closer).

        ``query_rows``: ``"auto"`` (a query byte-identical to a database row is that row),
        ``None`` (queries are outside the database) or one row index (-1: none) per query.
        """
        self._require_fit()
        raw = _as_matrix(queries, "queries")
        if raw.shape[1] != self.database_shape_[1]:
            raise LandlensError(f"queries have {raw.shape[1]} dimensions, the re-ranking database "
                                f"{self.database_shape_[1]}")
        rows = self._rows(raw, query_rows)
        with torch.no_grad():
            return self._score(_unit(raw), rows)

    def _check_database(self, db: Any) -> None:
        ref = self._checked() if self._checked is not None else None
        if ref is not None and ref is db:
            return
        a = _as_matrix(db, "database")
        if tuple(a.shape) != self.database_shape_ or _matrix_digest(a) != self.database_digest_:
            raise LandlensError(f"re-ranker {self.spec} was fitted on a database of shape {self.database_shape_}; "
                                f"it is asked to rank another one of shape {tuple(a.shape)}: fit it on that one")
        try:
            self._checked = weakref.ref(db)
        except TypeError:
            self._checked = None

    def __call__(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """Distances ``(b, n)`` as a :class:`~landlens.retrieval.distances.Distance`.

        ``db`` must be the fitted database (checked by content once per object); query rows
        are found automatically (see :meth:`distances`).
        """
        self._require_fit()
        self._check_database(db)
        return self.distances(q, "auto")

    def rerank(self, queries: np.ndarray | torch.Tensor, k: int, query_rows: Any = "auto",
               exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best database items per query: ``(distances, indices)``, both ``(b, k)``.

        Ordered by distance, ties by database index. ``exclude_self`` leaves out the query's
        own database row (found as in :meth:`distances`).
        """
        self._require_fit()
        raw = _as_matrix(queries, "queries")
        rows = self._rows(raw, query_rows)
        d = self.distances(raw, rows)
        if exclude_self:
            has = np.flatnonzero(rows >= 0)
            d[torch.from_numpy(has), torch.from_numpy(rows[has])] = float("inf")
        k = max(0, min(int(k), self.n_database_ - (1 if exclude_self and (rows >= 0).any() else 0)))
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        return torch.gather(d, 1, order).numpy(), order.numpy().astype(np.int64)

    def bind(self, query_rows: Sequence[int] | np.ndarray) -> "BoundReranker":
        """A distance for :func:`~landlens.retrieval.metrics.evaluate_retrieval` over queries
        whose database rows are known (``-1``: not in the database), called block after block
        in query order; it also times the re-ranking."""
        self._require_fit()
        return BoundReranker(self, np.asarray(query_rows, dtype=np.int64).reshape(-1))


class BoundReranker:
    """A fitted re-ranker used block by block over a known sequence of queries.

    ``evaluate_retrieval`` ranks query blocks in order; each call takes the next rows of
    ``query_rows`` and checks (by feature bytes) that the block holds those database rows.
    ``seconds`` and ``queries`` accumulate the time spent re-ranking.
    """

    symmetric = False

    def __init__(self, reranker: Reranker, query_rows: np.ndarray) -> None:
        self.reranker = reranker
        self.query_rows = query_rows
        self.position = 0
        self.seconds = 0.0
        self.queries = 0

    @property
    def name(self) -> str:
        return self.reranker.spec

    def to_dict(self) -> dict[str, Any]:
        return self.reranker.to_dict()

    def __call__(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        r = self.reranker
        r._check_database(db)
        raw = _as_matrix(q, "queries")
        s, e = self.position, self.position + raw.shape[0]
        if e > self.query_rows.shape[0]:
            raise RuntimeError(f"bound re-ranker called for queries {s}..{e} of {self.query_rows.shape[0]}")
        rows = self.query_rows[s:e]
        digests = _row_digests(raw)
        for i in np.flatnonzero(rows >= 0):
            if digests[i] != r.row_digests_[rows[i]]:
                raise RuntimeError(f"query {s + i} is not database row {rows[i]}: blocks out of order")
        self.position = e
        out = r.distances(raw, rows)
        self.seconds += time.perf_counter() - t0
        self.queries += raw.shape[0]
        return out


# ------------------------------------------------------------------------------ alpha-QE


class AlphaQE(Reranker):
    """alpha-weighted query expansion, optionally with alpha database-side augmentation.

    Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
    TPAMI 2018, Sec. 5 (alpha-QE): the query ``q`` (unit vector) is replaced by

        q' = normalise( q + sum_{i in N_n(q)} max(0, q.x_i)^alpha x_i )

    where ``N_n(q)`` are the ``n`` database vectors most similar to ``q`` (the query itself
    has weight ``1 = (q.q)^alpha``; alpha = 0 gives average query expansion, Chum et al.
    ICCV 2007). With ``dba = m > 0`` every database vector is first replaced the same way by
    the weighted sum of itself and its ``m`` nearest other database vectors (alpha-DBA,
    same paper; database-side augmentation of Arandjelović & Zisserman, CVPR 2012), and
    queries are expanded with and compared to the augmented vectors. A query that is a
    database row does not count itself among its neighbours. Distance: ``1 - q'.x'``.

    Attributes after :meth:`fit`: ``searched_`` (the database the queries are compared to,
    augmented when ``dba > 0``).
    """

    method = "aqe"
    reference = "Radenović, Tolias & Chum, TPAMI 2018, Sec. 5 (alpha-QE, alpha-DBA)"

    def __init__(self, n: int = 2, alpha: float = 3.0, dba: int = 0) -> None:
        self.n = int(n)
        self.alpha = float(alpha)
        self.dba = int(dba)
        if self.n < 1:
            raise ConfigError(f"aqe: n={n} must be >= 1 (neighbours added to the query)")
        if not self.alpha >= 0:
            raise ConfigError(f"aqe: alpha={alpha} must be >= 0")
        if self.dba < 0:
            raise ConfigError(f"aqe: dba={dba} must be >= 0 (0: no database-side augmentation)")

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "alpha": self.alpha, "dba": self.dba}

    def _weights(self, s: torch.Tensor) -> torch.Tensor:
        return s.clamp(min=0).pow(self.alpha)

    def _fit(self, x: torch.Tensor) -> None:
        if self.dba > 0:
            sims, idx = knn_graph(x, self.dba)
            self.searched_ = augment(x, x, sims, idx, self.alpha)
        else:
            self.searched_ = x

    def expand(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The expanded unit queries (``q`` already L2-normalised)."""
        s = q @ self.searched_.T
        has = np.flatnonzero(rows >= 0)
        if has.size:
            s[torch.from_numpy(has), torch.from_numpy(rows[has])] = -float("inf")  # not itself
        v, i = _topk_rows(s, self.n)
        return augment(q, self.searched_, v, i, self.alpha)

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        qe = self.expand(q, rows)
        return torch.addmm(torch.ones((), dtype=qe.dtype), qe, self.searched_.T, alpha=-1.0)


def augment(q: torch.Tensor, x: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor, alpha: float,
            chunk: int = 4096) -> torch.Tensor:
    """``normalise(q_i + sum_j max(0, sims_ij)^alpha x_{idx_ij})`` for every row ``i`` (alpha-QE/DBA)."""
    out = torch.empty_like(q)
    w = sims.clamp(min=0).pow(alpha)
    w = torch.where(torch.isfinite(sims), w, torch.zeros_like(w))
    for s in range(0, q.shape[0], chunk):
        e = min(q.shape[0], s + chunk)
        out[s:e] = q[s:e] + torch.einsum("bk,bkd->bd", w[s:e], x[idx[s:e]])
    return torch.nn.functional.normalize(out, dim=1)


# ------------------------------------------------------------------------------ diffusion


class Diffusion(Reranker):
    """Diffusion on the k-NN graph of the database, solved by conjugate gradient.

    Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on region manifolds:
    recovering small objects with compact CNN representations", CVPR 2017:

    - affinity (Sec. 3): ``a_ij = max(0, x_i.x_j)^gamma`` when ``x_i`` and ``x_j`` are
      *mutual* k-nearest neighbours (``graph=mutual``; ``graph=symmetric``: when either is
      among the other's k nearest), 0 otherwise and on the diagonal;
    - symmetric normalisation ``S = D^{-1/2} A D^{-1/2}``, ``D = diag(A 1)`` (isolated nodes
      get a zero row);
    - the query vector ``y``: ``y_i = max(0, q.x_i)^gamma`` for the ``kq`` database items most
      similar to the query, 0 elsewhere (a query that is a database row includes itself);
    - the ranking function ``f`` solves ``(I - alpha S) f = y`` (eq. of Zhou et al.'s
      manifold ranking; Sec. 4: conjugate gradient, ``iters`` iterations at most, relative
      residual ``tol``), and items rank by decreasing ``f``.

    Items the diffusion does not reach (``f <= 0``: another connected component, or more than
    ``iters`` edges away from the query's neighbours, since conjugate gradient's ``i``-th
    iterate lies in the span of ``y, Sy, ..., S^(i-1) y``) rank after every reached item, by
    cosine distance. Distances: ``-f / max f`` for reached items (in
    ``[-1, 0)``), ``1 + (1 - cos)`` for the others.

    Attributes after :meth:`fit`: ``searched_`` (normalised database), ``knn_indices_``,
    ``affinity_`` (sparse ``A``), ``transition_`` (sparse ``S``), ``degrees_``.
    """

    method = "diffusion"
    reference = "Iscen, Tolias, Avrithis, Furon & Chum, CVPR 2017, Sec. 3-4"

    def __init__(self, k: int = 50, kq: int = 10, gamma: float = 3.0, alpha: float = 0.99, iters: int = 20,
                 tol: float = 1e-6, graph: str = "mutual") -> None:
        self.k, self.kq, self.gamma, self.alpha = int(k), int(kq), float(gamma), float(alpha)
        self.iters, self.tol, self.graph = int(iters), float(tol), str(graph)
        if self.k < 1 or self.kq < 1:
            raise ConfigError(f"diffusion: k={k} and kq={kq} must be >= 1")
        if not self.gamma > 0:
            raise ConfigError(f"diffusion: gamma={gamma} must be > 0")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"diffusion: alpha={alpha} must be in (0, 1)")
        if self.iters < 1 or not self.tol > 0:
            raise ConfigError(f"diffusion: iters={iters} must be >= 1 and tol={tol} > 0")
        if self.graph not in ("mutual", "symmetric"):
            raise ConfigError(f"diffusion: graph={graph!r} must be 'mutual' or 'symmetric'")

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "kq": self.kq, "gamma": self.gamma, "alpha": self.alpha, "iters": self.iters,
                "tol": self.tol, "graph": self.graph}

    def _fit(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.searched_ = x
        sims, idx = knn_graph(x, self.k)
        self.knn_indices_ = idx.numpy()
        w = sims.clamp(min=0).pow(self.gamma).numpy().astype(np.float64).ravel()
        rows = np.repeat(np.arange(n), idx.shape[1])
        a = sp.csr_matrix((w, (rows, self.knn_indices_.ravel())), shape=(n, n))
        a = a.minimum(a.T) if self.graph == "mutual" else a.maximum(a.T)  # the diagonal is empty: no self-edges
        a.eliminate_zeros()
        self.affinity_ = a.tocsr()
        deg = np.asarray(self.affinity_.sum(axis=1)).ravel()
        self.degrees_ = deg
        dinv = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
        dm = sp.diags(dinv)
        self.transition_ = (dm @ self.affinity_ @ dm).tocsr()
        self._system = (sp.identity(n, format="csr") - self.alpha * self.transition_).tocsr()

    def query_vector(self, q: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """``(y, s)``: ``y`` ``(n, b)`` the diffusion's starting vectors, ``s`` ``(b, n)`` cosines."""
        s = q @ self.searched_.T
        v, i = _topk_rows(s, self.kq)
        y = torch.zeros_like(s)
        y.scatter_(1, i, v.clamp(min=0).pow(self.gamma))
        return np.ascontiguousarray(y.numpy().T, dtype=np.float64), s

    def solve(self, y: np.ndarray) -> np.ndarray:
        """``f`` with ``(I - alpha S) f = y`` for every column of ``y`` (conjugate gradient)."""
        return conjugate_gradient(self._system, y, self.iters, self.tol)

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        y, s = self.query_vector(q)
        f = self.solve(y).T  # (b, n)
        fmax = f.max(axis=1, keepdims=True)
        reached = f > 0
        scaled = -f / np.where(fmax > 0, fmax, 1.0)
        out = np.where(reached, scaled, 2.0 - s.numpy().astype(np.float64))
        return torch.from_numpy(out.astype(np.float32))


def conjugate_gradient(a: sp.spmatrix, b: np.ndarray, iters: int = 20, tol: float = 1e-6) -> np.ndarray:
    """Solve ``a x = b`` for a symmetric positive-definite sparse ``a`` and each column of ``b``.

    Plain conjugate gradient (Hestenes & Stiefel 1952) run on all columns at once, each with
    its own step sizes; a column stops when its residual is below ``tol`` times ``|b|``.
    """
    b = np.asarray(b, dtype=np.float64)
    one = b.ndim == 1
    if one:
        b = b[:, None]
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = np.einsum("ij,ij->j", r, r)
    limit = (tol ** 2) * rs
    active = rs > 0
    for _ in range(int(iters)):
        if not active.any():
            break
        ap = a @ p
        pap = np.einsum("ij,ij->j", p, ap)
        step = np.where(active & (pap > 0), rs / np.where(pap > 0, pap, 1.0), 0.0)
        x += step * p
        r -= step * ap
        rs_new = np.einsum("ij,ij->j", r, r)
        active &= rs_new > limit
        beta = np.where(rs > 0, rs_new / np.where(rs > 0, rs, 1.0), 0.0)
        p = r + beta * p
        rs = rs_new
    return x[:, 0] if one else x


# ------------------------------------------------------------------------------ k-reciprocal


class KReciprocal(Reranker):
    """k-reciprocal re-ranking with the Jaccard distance.

    Zhong, Zheng, Cao & Li, "Re-ranking person re-identification with k-reciprocal
    encoding", CVPR 2017, Sec. 3, with ``d(p, g) = 1 - p.g`` (cosine distance of unit
    vectors, half their squared Euclidean distance) as the original distance:

    - ``N(p, k)``: ``p`` and its ``k`` nearest neighbours (eq. 1); the k-reciprocal set
      ``R(p, k) = {g in N(p, k) : p in N(g, k)}`` (eq. 2);
    - expansion (eq. 3): ``R*(p, k1) = R(p, k1) u R(q, k1/2)`` for every ``q in R(p, k1)``
      with ``|R(p, k1) n R(q, k1/2)| > 2/3 |R(q, k1/2)|`` (``k1/2`` rounded half to even);
    - the k-reciprocal feature (eq. 7): ``V_pg = exp(-d(p, g))`` for ``g in R*(p, k1)``,
      0 otherwise, scaled to sum 1;
    - local query expansion (eq. 11): ``V_p <- mean of V_g over g in N(p, k2)``;
    - Jaccard distance (eq. 10): ``d_J(p, g) = 1 - sum_j min(V_pj, V_gj) / sum_j max(V_pj, V_gj)``;
    - final distance (eq. 12): ``d* = (1 - lambda) d_J + lambda d``.

    Everything is computed on the k-NN candidate lists (sparse ``V``, inverted lists for
    the Jaccard sums), never on ``n x n`` matrices; items sharing nothing with the query get
    ``d_J = 1`` exactly as in the full computation. A query that is a database row uses its
    row of the database's ``V`` (the method with the query as a member of the collection). A
    query from outside gets its reciprocal set against the database plus itself (the
    database items' own sets are not updated with the query).

    Attributes after :meth:`fit`: ``searched_``, ``ranks_`` (``(n, K+1)``: each row then its
    nearest others), ``features_`` (sparse ``V`` after local expansion), ``raw_features_``
    (before it), ``half_sets_`` (sparse ``R(., k1/2)``).
    """

    method = "kreciprocal"
    reference = "Zhong, Zheng, Cao & Li, CVPR 2017, Sec. 3 (eq. 1-3, 7, 10-12)"

    def __init__(self, k1: int = 20, k2: int = 6, lam: float = 0.3) -> None:
        self.k1, self.k2, self.lam = int(k1), int(k2), float(lam)
        if self.k1 < 1 or self.k2 < 1:
            raise ConfigError(f"kreciprocal: k1={k1} and k2={k2} must be >= 1")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"kreciprocal: lambda={lam} must be in [0, 1]")

    def params(self) -> dict[str, Any]:
        return {"k1": self.k1, "k2": self.k2, "lambda": self.lam}

    @property
    def k_half(self) -> int:
        return int(np.around(self.k1 / 2.0))

    def _fit(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.searched_ = x
        k1 = min(self.k1, n - 1)
        kh = min(self.k_half, n - 1)
        big = max(k1, self.k2 - 1)
        sims, idx = knn_graph(x, big)
        self.ranks_ = np.concatenate([np.arange(n)[:, None], idx.numpy()], axis=1)
        self._k1, self._kh = k1, kh
        # the similarity to the k-th other neighbour: an outside query enters N(g, k) above it
        others = sims.numpy()
        self.kth_similarity_ = others[:, k1 - 1] if k1 >= 1 else np.full(n, np.inf, np.float32)
        self.half_kth_similarity_ = others[:, kh - 1] if kh >= 1 else np.full(n, np.inf, np.float32)
        r1 = _reciprocal(self.ranks_, k1)
        rh = _reciprocal(self.ranks_, kh)
        self.half_sets_ = rh
        size_h = np.diff(rh.indptr)
        # overlap |R(p, k1) n R(q, k1/2)| for q in R(p, k1): (r1 @ rh.T) on r1's pattern
        ov = (r1 @ rh.T).multiply(r1).tocoo()
        keep = ov.data > (2.0 / 3.0) * size_h[ov.col]
        g = sp.csr_matrix((np.ones(int(keep.sum())), (ov.row[keep], ov.col[keep])), shape=(n, n))
        e = (r1 + g @ rh).tocoo()
        d = _pair_distances(x, e.row, e.col)
        v = sp.csr_matrix((np.exp(-d), (e.row, e.col)), shape=(n, n))
        self.row_mass_ = np.asarray(v.sum(axis=1)).ravel()
        self.raw_features_ = _row_normalise(v)
        # local query expansion (eq. 11): the mean of V over N(g, k2) (g and its k2 - 1 nearest)
        k2 = min(self.k2, self.ranks_.shape[1])
        self._k2 = k2
        self.k2_similarity_ = others[:, k2 - 2] if k2 >= 2 else np.full(n, np.inf, np.float32)
        cols = self.ranks_[:, :k2]
        self._mix = sp.csr_matrix((np.full(cols.size, 1.0 / k2), (np.repeat(np.arange(n), k2), cols.ravel())),
                                  shape=(n, n))
        self._mix_columns = self._mix.tocsc()
        self.features_ = (self._mix @ self.raw_features_).tocsr() if k2 > 1 else self.raw_features_
        self._columns = self.features_.tocsc()
        rf = self.raw_features_
        self._raw_pad = sp.csr_matrix((rf.data, rf.indices, rf.indptr), shape=(n, n + 1))

    def _outside(self, si: np.ndarray, top: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, sp.csr_matrix]:
        """One query from outside the database, inserted as node ``q`` (column ``n``).

        Returns its expanded feature ``V_q`` ``(1, n + 1)``, the database rows whose expanded
        feature changes when ``q`` joins, and those rows' new features ``(A, n + 1)``.
        First-order insertion: a database item ``h`` with ``q`` in ``R(h, k1)`` gets weight on
        ``q`` (its row rescaled to sum 1), and the local expansion ``N(g, k2)`` of every item
        takes ``q`` in where ``q`` is among its ``k2`` nearest; the changes that ``q`` makes to
        other items' reciprocal sets (an item pushed out of a ``k1`` list) are not followed.
        """
        n = si.shape[0]
        k1, kh, k2 = self._k1, self._kh, self._k2
        raw = self._raw_pad
        # R(q, k1) and its expansion R*(q, k1) (eq. 2-3), the query itself included
        cand = top[:k1]
        recip = cand[si[cand] > self.kth_similarity_[cand]]
        rset = set(recip.tolist())
        expansion = set(rset)
        half = set(top[:kh].tolist())
        hs = self.half_sets_
        for c in recip:
            hc = set(hs.indices[hs.indptr[c]:hs.indptr[c + 1]].tolist())
            q_in = c in half and si[c] > self.half_kth_similarity_[c]  # q in R(c, k1/2)
            if len(hc & rset) + q_in > (2.0 / 3.0) * (len(hc) + q_in):
                expansion |= hc
        cols = np.fromiter(sorted(expansion), dtype=np.int64, count=len(expansion))
        w = np.exp(-(1.0 - si[cols].astype(np.float64)))
        total = 1.0 + w.sum()  # exp(-d(q, q)) = 1 for the query's own coordinate
        vq_raw = sp.csr_matrix((np.append(w, 1.0) / total, (np.zeros(cols.size + 1, np.int64),
                                                            np.append(cols, n))), shape=(1, n + 1))
        # items h with q in R(h, k1): V'_h = (Z_h V_h + exp(-d(h, q)) e_q) / (Z_h + exp(-d(h, q)))
        wh = np.exp(-(1.0 - si[recip].astype(np.float64)))
        z = self.row_mass_[recip]
        delta = (sp.diags(z / (z + wh) - 1.0) @ raw[recip]
                 + sp.csr_matrix((wh / (z + wh), (np.arange(recip.size), np.full(recip.size, n))),
                                 shape=(recip.size, n + 1))).tocsr()
        pos = np.full(n, -1, dtype=np.int64)
        pos[recip] = np.arange(recip.size)
        # local expansion of q (eq. 11): q and its k2 - 1 nearest database items
        nb = top[: k2 - 1]
        vq = vq_raw + sp.csr_matrix(np.ones((1, nb.size))) @ raw[nb]
        if (pos[nb] >= 0).any():
            vq = vq + sp.csr_matrix(np.ones((1, int((pos[nb] >= 0).sum())))) @ delta[pos[nb][pos[nb] >= 0]]
        vq = (vq / k2).tocsr()
        # database items whose local expansion changes
        gains = np.flatnonzero(si > self.k2_similarity_) if k2 >= 2 else np.zeros(0, np.int64)
        mc = self._mix_columns
        via = np.concatenate([mc.indices[mc.indptr[h]:mc.indptr[h + 1]] for h in recip]) if recip.size else gains
        affected = np.union1d(gains, via).astype(np.int64)
        if affected.size == 0:
            return vq, affected, sp.csr_matrix((0, n + 1))
        mix = self._mix[affected].tolil()
        is_gain = np.isin(affected, gains)
        for a in np.flatnonzero(is_gain):  # q enters N(g, k2); its last member leaves
            mix[a, self.ranks_[affected[a], k2 - 1]] = 0.0
        mix = mix.tocsr()
        mix.eliminate_zeros()
        vnew = mix @ raw
        if recip.size:
            vnew = vnew + mix[:, recip] @ delta
        if is_gain.any():
            vnew = vnew + sp.csr_matrix(is_gain.astype(np.float64)[:, None] / k2) @ vq_raw
        return vq, affected, vnew.tocsr()

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        s = q @ self.searched_.T
        b, n = s.shape
        inside = rows >= 0
        fixes = []
        if inside.all():
            vq = self.features_[rows]
        else:
            sn = s.numpy()
            top = _topk_rows(s, max(self._k1, self._k2 - 1))[1].numpy()
            parts = []
            for r in range(b):
                if inside[r]:
                    parts.append(sp.hstack([self.features_[rows[r]], sp.csr_matrix((1, 1))]))
                    continue
                v, affected, vnew = self._outside(sn[r], top[r])
                parts.append(v)
                fixes.append((r, v, affected, vnew))
            vq = sp.vstack(parts, format="csr")[:, :n]
        m = jaccard_min_sums(vq, self._columns)
        for r, v, affected, vnew in fixes:
            if affected.size:
                rep = sp.csr_matrix(np.ones((affected.size, 1))) @ v
                m[r, affected] = np.asarray(vnew.minimum(rep).sum(axis=1)).ravel()
        dj = 1.0 - m / (2.0 - m)
        out = (1.0 - self.lam) * dj + self.lam * (1.0 - s.numpy().astype(np.float64))
        return torch.from_numpy(out.astype(np.float32))


def _reciprocal(ranks: np.ndarray, k: int) -> sp.csr_matrix:
    """``R(p, k)`` of every row as a 0/1 sparse matrix: ``g in N(p, k)`` and ``p in N(g, k)``."""
    n = ranks.shape[0]
    cols = ranks[:, : k + 1]
    a = sp.csr_matrix((np.ones(cols.size), (np.repeat(np.arange(n), cols.shape[1]), cols.ravel())), shape=(n, n))
    a.data[:] = 1.0  # duplicate entries (none expected) count once
    return a.multiply(a.T).tocsr()


def _pair_distances(x: torch.Tensor, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    out = np.empty(i.shape[0], dtype=np.float64)
    for s in range(0, i.shape[0], chunk):
        a = torch.from_numpy(i[s:s + chunk])
        b = torch.from_numpy(j[s:s + chunk])
        out[s:s + chunk] = (1.0 - (x[a] * x[b]).sum(1)).double().numpy()
    return out


def _row_normalise(m: sp.csr_matrix) -> sp.csr_matrix:
    sums = np.asarray(m.sum(axis=1)).ravel()
    return (sp.diags(np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)) @ m).tocsr()


def jaccard_min_sums(q: sp.csr_matrix, columns: sp.csc_matrix) -> np.ndarray:
    """``m[i, g] = sum_j min(q_ij, V_gj)`` for every query row and database row ``g``.

    ``columns`` is ``V`` in CSC form: column ``j`` lists the database rows with ``V_gj > 0``
    (the inverted lists of Zhong et al.), so only pairs sharing a coordinate are visited.
    """
    q = q.tocsr()
    b, n = q.shape[0], columns.shape[0]
    out = np.zeros((b, n), dtype=np.float64)
    qc = q.tocoo()
    order = np.lexsort((qc.col, qc.row))
    qi, qj, qv = qc.row[order], qc.col[order], qc.data[order]
    starts = columns.indptr[qj]
    counts = columns.indptr[qj + 1] - starts
    ends = np.cumsum(counts)
    s = 0
    while s < qi.shape[0]:
        e = int(np.searchsorted(ends, (ends[s - 1] if s else 0) + PAIR_CHUNK, side="right"))
        e = max(e, s + 1)
        cnt = counts[s:e]
        total = int(cnt.sum())
        if total:
            rep = np.repeat(np.arange(s, e), cnt)
            offs = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(starts[s:e], cnt)
            vals = np.minimum(qv[rep], columns.data[offs])
            flat = qi[rep].astype(np.int64) * n + columns.indices[offs]
            out += np.bincount(flat, weights=vals, minlength=b * n).reshape(b, n)
        s = e
    return out


# ------------------------------------------------------------------------------ pipeline


class RerankPipeline(Reranker):
    """alpha-QE (optionally with alpha-DBA) followed by a graph re-ranker.

    The graph method (diffusion or k-reciprocal) is fitted on the database the expansion
    searches (augmented with ``dba``) and ranks for the expanded queries, which are treated
    as queries from outside the database.
    """

    method = "pipeline"

    def __init__(self, expansion: AlphaQE, graph: Reranker) -> None:
        if not isinstance(expansion, AlphaQE) or isinstance(graph, (AlphaQE, RerankPipeline)):
            raise ConfigError("a re-ranking combination is aqe followed by diffusion or kreciprocal")
        self.expansion = expansion
        self.graph = graph

    @property
    def spec(self) -> str:
        return f"{self.expansion.spec}+{self.graph.spec}"

    @property
    def reference(self) -> str:  # type: ignore[override]
        return f"{self.expansion.reference}; {self.graph.reference}"

    def params(self) -> dict[str, Any]:
        return {self.expansion.method: self.expansion.params(), self.graph.method: self.graph.params()}

    def _fit(self, x: torch.Tensor) -> None:
        self.expansion._fit(x)
        self.graph._fit(self.expansion.searched_)
        self.searched_ = self.expansion.searched_

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        qe = self.expansion.expand(q, rows)
        return self.graph._score(qe, np.full(qe.shape[0], -1, dtype=np.int64))


# ------------------------------------------------------------------------------ specs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


_METHODS: dict[str, tuple[type, dict[str, tuple[str, type]]]] = {
    "aqe": (AlphaQE, {"n": ("n", int), "alpha": ("alpha", float), "dba": ("dba", int)}),
    "diffusion": (Diffusion, {"k": ("k", int), "kq": ("kq", int), "gamma": ("gamma", float),
                              "alpha": ("alpha", float), "iters": ("iters", int), "tol": ("tol", float),
                              "graph": ("graph", str)}),
    "kreciprocal": (KReciprocal, {"k1": ("k1", int), "k2": ("k2", int), "lambda": ("lam", float),
                                  "lam": ("lam", float)}),
}
_ALIASES = {"alpha-qe": "aqe", "alphaqe": "aqe", "qe": "aqe", "dfs": "diffusion", "k-reciprocal": "kreciprocal",
            "krr": "kreciprocal", "kr": "kreciprocal"}
_STAGE = re.compile(r"^(?P<name>[a-z][a-z0-9_-]*)(?::(?P<opts>.*))?$")

SPEC_HELP = ("aqe[:n=2,alpha=3,dba=0] | diffusion[:k=50,kq=10,gamma=3,alpha=0.99,iters=20,tol=1e-6,graph=mutual] "
             "| kreciprocal[:k1=20,k2=6,lambda=0.3] | aqe+diffusion | aqe+kreciprocal")


def _stage(text: str, spec: str) -> Reranker:
    m = _STAGE.match(text)
    if not m:
        raise ConfigError(f"re-ranking spec {spec!r}: cannot read {text!r}; expected e.g. {SPEC_HELP}")
    name = _ALIASES.get(m.group("name"), m.group("name"))
    if name not in _METHODS:
        raise ConfigError(f"re-ranking spec {spec!r}: unknown method {m.group('name')!r}; "
                          f"available: {', '.join(_METHODS)}")
    cls, keys = _METHODS[name]
    kwargs: dict[str, Any] = {}
    opts = m.group("opts")
    if opts is not None:
        for item in opts.split(","):
            if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
                raise ConfigError(f"re-ranking spec {spec!r}: {item!r} is not key=value ({name} keys: "
                                  f"{', '.join(k for k in keys if k != 'lam')})")
            key, value = item.split("=", 1)
            if key not in keys:
                raise ConfigError(f"re-ranking spec {spec!r}: unknown {name} setting {key!r}; "
                                  f"known: {', '.join(k for k in keys if k != 'lam')}")
            arg, kind = keys[key]
            if arg in kwargs:
                raise ConfigError(f"re-ranking spec {spec!r}: {name} setting {key!r} given twice")
            try:
                if kind is int:
                    f = float(value)
                    if not f.is_integer():
                        raise ValueError
                    kwargs[arg] = int(f)
                elif kind is float:
                    f = float(value)
                    if not math.isfinite(f):
                        raise ValueError
                    kwargs[arg] = f
                else:
                    kwargs[arg] = value
            except ValueError:
                raise ConfigError(f"re-ranking spec {spec!r}: {name} {key}={value!r} is not "
                                  f"{'an integer' if kind is int else 'a number'}") from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"re-ranking spec {spec!r}: {exc}") from None


def make_reranker(spec: str) -> Reranker:
    """A re-ranker from a spec (see the module docstring and :data:`SPEC_HELP`).

    ``"aqe"``, ``"diffusion"``, ``"kreciprocal"``, each optionally followed by
    ``:key=value,...``; ``"aqe+diffusion"`` / ``"aqe+kreciprocal"`` chain query expansion and
    a graph method. Unknown methods or keys, malformed values and other combinations raise
    :class:`~landlens.errors.ConfigError` with one line.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"re-ranking spec {spec!r} is empty; expected e.g. {SPEC_HELP}")
    text = spec.strip().lower().replace(" ", "")
    parts = text.split("+")
    if any(not p for p in parts):
        raise ConfigError(f"re-ranking spec {spec!r}: empty part around '+'")
    stages = [_stage(p, spec) for p in parts]
    if len(stages) == 1:
        return stages[0]
    if len(stages) == 2 and isinstance(stages[0], AlphaQE) and not isinstance(stages[1], AlphaQE):
        return RerankPipeline(stages[0], stages[1])
    raise ConfigError(f"re-ranking spec {spec!r}: a combination is aqe followed by one of diffusion, "
                      f"kreciprocal (e.g. 'aqe+diffusion')")


__all__ = [
    "AlphaQE",
    "BoundReranker",
    "Diffusion",
    "KReciprocal",
    "RerankPipeline",
    "Reranker",
    "SPEC_HELP",
    "augment",
    "conjugate_gradient",
    "jaccard_min_sums",
    "knn_graph",
    "make_reranker",
]
