"""Retrieval metrics of the remote-sensing literature, vectorised over queries and database.

Each query ranks its database by ascending distance; a database item is *relevant* when it
has the query's class. Definitions, for a query with ``N`` database items (after leaving out
the query itself where the protocol says so) of which ``G`` are relevant, relevant items at
ranks ``r_1 < r_2 < ... < r_G`` (1-based):

- **Ranking and ties.** The order is a stable sort by distance, then by database index: of
  two items at exactly the same distance the one with the lower database index ranks first.
  Given the distance values, results are exact and repeatable (no dependence on the sort
  algorithm or threads). Distances computed by float32 matrix products can differ in the
  last bit with the block layout, which can only swap items whose distances agree to float32
  precision.
- **AP** (average precision): ``(1/G) sum_i i / r_i``, the mean over relevant items of the
  precision at their rank; **mAP** is its mean over queries. This is the non-interpolated AP
  of TREC and of ``sklearn.metrics.average_precision_score`` on untied scores.
- **P@k**: the fraction of relevant items among the first ``min(k, N)`` results. When ``k``
  exceeds the database size the precision is taken over the whole ranking (``N`` results),
  so P@k never counts results that cannot exist; :attr:`RetrievalScores.truncated_precision_at`
  lists the ``k`` for which this happened.
- **ANMRR** (Average Normalized Modified Retrieval Rank, MPEG-7: B. S. Manjunath, J.-R. Ohm,
  V. V. Vasudevan, A. Yamada, "Color and texture descriptors", IEEE TCSVT 11(6), 2001,
  eq. for NMRR): ``K = 2G`` (the usual remote-sensing choice); ``Rank(i) = r_i`` if
  ``r_i <= K`` else ``1.25 K``; ``AVR = (1/G) sum_i Rank(i)``; ``MRR = AVR - 0.5 - G/2``;
  ``NMRR = MRR / (1.25 K - 0.5 - G/2)``; ANMRR is the mean NMRR (0 perfect, 1 worst).
- **Class-wise mAP**: the mean AP over the queries of each class.
- **Top-k confusion matrix**: row ``c`` counts the classes of the first ``min(k, N)`` results
  of every query of class ``c``, normalised so that the row sums to 1 (a perfect ranking with
  ``k <= G`` for every query gives the identity).
- **Queries without relevant items** (``G = 0``, e.g. the only image of its class in the
  archive): AP, NMRR and P@k are undefined; such queries are left out of every mean (mAP,
  ANMRR, P@k, class-wise mAP, confusion matrix), their count is recorded
  (:attr:`RetrievalScores.n_skipped`) and a :class:`NoRelevantWarning` is issued.

Implementation: per block of queries, distances come from one batched call of the distance;
each row's (distance, database index, relevance) triple is packed into one int64 key (the
float32 distance's order-preserving bits, then the index, then a relevance bit) and sorted
with numpy's SIMD sort, after which relevance and indices are read back from the keys. Only
the positions of relevant items are processed further, so the cost beyond the distance
computation is one sort per query. Distances that are not float32 use a stable torch sort.
When the queries are the database (``archive``) and the distance is symmetric, each block of
distances is computed once and its transpose reused for the later query blocks, halving the
matrix-product work.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from landlens.errors import LandlensError
from landlens.retrieval.distances import BaseDistance, Distance, get_distance, pairwise_distances

DEFAULT_PRECISION_AT: tuple[int, ...] = (5, 10, 50, 100, 1000)
DEFAULT_CONFUSION_K = 10
#: Bytes of per-block working memory that the default block size aims at.
DEFAULT_BLOCK_BYTES = 256 * 1024 * 1024
#: Default limit of the memory that the archive protocol may use to reuse symmetric distances.
DEFAULT_SYMMETRIC_CACHE_BYTES = 1024 * 1024 * 1024
_BYTES_PER_CELL = 40  # distance f32, int32 key, int64 key, relevance, temporaries

_LITTLE_ENDIAN = sys.byteorder == "little"

RankingMethod = Literal["auto", "packed", "stable-sort"]


class NoRelevantWarning(UserWarning):
    """Some queries have no relevant item in their database and were left out of the means."""


@dataclass
class RetrievalScores:
    """Per-query scores and the top-k class confusion; summary numbers are methods/properties.

    Per-query arrays hold NaN for queries without relevant items (``n_relevant == 0``).
    """

    ap: np.ndarray
    nmrr: np.ndarray
    precision_at: dict[int, np.ndarray]
    query_labels: np.ndarray
    classes: list[str] = field(default_factory=list)
    n_relevant: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    database_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    confusion_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    confusion_k: int = DEFAULT_CONFUSION_K

    # -------------------------------------------------------------------- counts
    @property
    def scored(self) -> np.ndarray:
        """Mask of the queries that have at least one relevant item (those that count)."""
        if self.n_relevant.shape != self.ap.shape:  # built without counts: NaN marks G = 0
            return ~np.isnan(self.ap)
        return self.n_relevant > 0

    @property
    def n_queries(self) -> int:
        return int(self.ap.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def n_skipped(self) -> int:
        """Queries left out of every mean because they have no relevant item (G = 0)."""
        return self.n_queries - self.n_scored

    @property
    def truncated_precision_at(self) -> list[int]:
        """The ``k`` of P@k that exceed some query's database size (precision over N results there)."""
        if self.database_size.size == 0:
            return []
        smallest = int(self.database_size.min())
        return [k for k in self.precision_at if k > smallest]

    # -------------------------------------------------------------------- means
    def _mean(self, values: np.ndarray) -> float:
        v = values[self.scored]
        return float(v.mean()) if v.size else float("nan")

    @property
    def map(self) -> float:
        """Mean average precision over the scored queries (NaN when none)."""
        return self._mean(self.ap)

    @property
    def anmrr(self) -> float:
        """Average normalized modified retrieval rank over the scored queries (NaN when none)."""
        return self._mean(self.nmrr)

    def precision(self, k: int) -> float:
        """Mean P@k over the scored queries."""
        return self._mean(self.precision_at[k])

    def class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)

    def classwise_map(self) -> dict[str, float]:
        """``{class: mAP}`` over the scored queries of each class (classes with none are absent)."""
        out: dict[str, float] = {}
        s = self.scored
        for c in np.unique(self.query_labels[s]):
            out[self.class_name(int(c))] = float(self.ap[s & (self.query_labels == c)].mean())
        return out

    def confusion_matrix(self) -> np.ndarray:
        """Row-normalised top-k confusion ``(C, C)``: rows query class, columns retrieved class.

        Rows of classes without scored queries are all zero.
        """
        counts = self.confusion_counts.astype(np.float64)
        totals = counts.sum(1, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    def summary(self) -> dict[str, float]:
        """``{'mAP', 'ANMRR', 'P@k'...}`` (fractions, not percent)."""
        d = {"mAP": self.map, "ANMRR": self.anmrr}
        for k in self.precision_at:
            d[f"P@{k}"] = self.precision(k)
        return d

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, class-wise mAP, confusion matrix and query accounting."""
        n_classes = self.confusion_counts.shape[0]
        names = [self.class_name(c) for c in range(n_classes)]
        return {
            "metrics": _json_floats(self.summary()),
            "classwise_map": _json_floats(self.classwise_map()),
            "queries": {"total": self.n_queries, "scored": self.n_scored,
                        "skipped_no_relevant": self.n_skipped},
            "database_size": {"min": int(self.database_size.min()) if self.database_size.size else 0,
                              "max": int(self.database_size.max()) if self.database_size.size else 0},
            "precision_at": {"k": list(self.precision_at),
                             "truncated_to_database_size": self.truncated_precision_at},
            "confusion": {"k": self.confusion_k, "classes": names,
                          "matrix": np.round(self.confusion_matrix(), 6).tolist(),
                          "counts": self.confusion_counts.astype(int).tolist()},
        }


def _json_floats(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v != v else float(v)) for k, v in d.items()}


# ----------------------------------------------------------------------------- block ranking


@dataclass
class RankedBlock:
    """What the metrics need from one block of ranked queries (numpy arrays).

    Attributes:
        rel_rows, rel_ranks: for every relevant database item of every query, the query's row
            in the block and the item's 1-based rank, ordered by row then rank.
        n_relevant: ``G`` per query.
        database_size: ``N`` per query (the database minus the excluded item).
        top_indices: ``(b, k)`` database indices of the first ``k`` results in rank order
            (``-1`` past ``N``).
    """

    rel_rows: np.ndarray
    rel_ranks: np.ndarray
    n_relevant: np.ndarray
    database_size: np.ndarray
    top_indices: np.ndarray


_HIGH_FINITE = 0x7F800000  # the int32 key of +inf (float32 bits); -inf maps to -_HIGH_FINITE
_EXCLUDED_KEY = (1 << 63) - 2  # sorts after every real key; relevance bit 0
_HI, _LO = (1, 0) if _LITTLE_ENDIAN else (0, 1)  # int32 halves of an int64
_LOW_BYTE = 0 if _LITTLE_ENDIAN else 7
_NON_FINITE = ("the distance produced non-finite values (features with NaN/inf, or too large); "
               "check the features")


def _float_keys_(bits: np.ndarray) -> np.ndarray:
    """Turn float32 bit patterns (an int32 view) into keys of the same order, in place.

    Non-negative floats keep their bits; a negative one becomes minus its magnitude bits, so
    ``-0.0`` and ``0.0`` get the same key. Nothing is written when no value is negative.
    """
    if bits.size and int(bits.min()) < 0:
        m = bits >> 31  # -1 for negative values, 0 otherwise
        np.bitwise_and(bits, 0x7FFFFFFF, out=bits)
        np.bitwise_xor(bits, m, out=bits)
        np.subtract(bits, m, out=bits)
    return bits


def _sort_rows(arr: np.ndarray, threads: int) -> None:
    """Sort each row of ``arr`` in place (numpy's SIMD sort; row chunks in parallel threads)."""
    if threads <= 1 or arr.shape[0] < 2 * threads:
        arr.sort(axis=1)
        return
    from concurrent.futures import ThreadPoolExecutor

    bounds = np.linspace(0, arr.shape[0], threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as ex:  # numpy releases the GIL while sorting
        list(ex.map(lambda i: arr[bounds[i]:bounds[i + 1]].sort(axis=1), range(threads)))


class _Workspace:
    """Buffers reused from block to block (fresh large allocations cost page faults each time)."""

    def __init__(self, rows: int, n: int, database_labels: np.ndarray) -> None:
        self.n = n
        self.dist = torch.empty((rows, n), dtype=torch.float32)
        self.key = np.empty((rows, n), dtype=np.int64)
        self.bits = np.empty((rows, n), dtype=np.uint8)
        self.labels = database_labels
        self._low: dict[int, np.ndarray] = {}
        self._idx2 = np.arange(0, 2 * n, 2, dtype=np.int32)
        self._cache_low = len(np.unique(database_labels)) * n <= 1 << 26

    def low_words(self, label: int) -> np.ndarray:
        """``2 * index + relevant`` for every database item, for queries of class ``label``."""
        low = self._low.get(label)
        if low is None:
            low = self._idx2 + (self.labels == label)
            if self._cache_low:
                self._low[label] = low
        return low


def rank_block(d: torch.Tensor, query_labels: np.ndarray | torch.Tensor, database_labels: np.ndarray | torch.Tensor,
               exclude: np.ndarray | torch.Tensor | None = None, top_k: int = 0,
               method: RankingMethod = "auto", threads: int = 1, workspace: _Workspace | None = None
               ) -> RankedBlock:
    """Rank the database for a block of queries and locate the relevant items.

    The ranking is by distance, then by database index (ties). ``d`` is overwritten.

    Args:
        d: ``(b, n)`` distances; a non-finite value raises :class:`LandlensError`.
        query_labels: ``(b,)`` class of each query.
        database_labels: ``(n,)`` class of each database item.
        exclude: ``(b,)`` database index each query leaves out (``-1``: none), e.g. itself.
        top_k: how many leading result indices to return (in rank order).
        method: ``packed`` (float32 only): one int64 key per cell, the distance's
            order-preserving bits above the database index and a relevance bit, sorted by
            numpy; ``stable-sort``: a torch stable sort of the distances; ``auto``: packed
            for float32 distances. Both give the same ranking.
        threads: threads for the packed sort.
        workspace: reusable buffers (internal).
    """
    ql = np.asarray(query_labels, dtype=np.int64)
    dl = np.asarray(database_labels, dtype=np.int64)
    b, n = d.shape
    size = np.full(b, n, dtype=np.int64)
    rows_e = cols_e = np.zeros(0, dtype=np.int64)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64)
        rows_e = np.flatnonzero(ex >= 0)
        cols_e = ex[rows_e]
        size[rows_e] -= 1
    counts = np.bincount(dl, minlength=int(ql.max()) + 1 if b else 0)
    n_rel = counts[ql].astype(np.int64)
    n_rel[rows_e] -= dl[cols_e] == ql[rows_e]
    if method == "auto":
        method = "packed" if d.dtype == torch.float32 and n < 2**30 else "stable-sort"
    if method == "packed":
        if d.dtype != torch.float32:
            raise ValueError("the packed ranking needs float32 distances")
        fits = workspace is not None and workspace.n == n and workspace.key.shape[0] >= b
        ws = workspace if fits else _Workspace(b, n, dl)
        dn = d.contiguous().numpy()
        dn[rows_e, cols_e] = np.inf  # keeps the minimum check below meaningful
        bits = _float_keys_(dn.view(np.int32))
        key = ws.key[:b]
        words = key.view(np.int32).reshape(b, n, 2)
        np.copyto(words[:, :, _HI], bits)
        for r in range(b):
            np.copyto(words[r, :, _LO], ws.low_words(int(ql[r])))
        key[rows_e, cols_e] = _EXCLUDED_KEY
        _sort_rows(key, threads)
        if b and n:
            first = words[:, 0, _HI]
            last = words[np.arange(b), np.maximum(size - 1, 0), _HI]
            if bool(((first <= -_HIGH_FINITE) | (last >= _HIGH_FINITE)).any()):
                raise LandlensError(_NON_FINITE)
        flags = ws.bits[:b]
        np.bitwise_and(key.view(np.uint8).reshape(b, n, 8)[:, :, _LOW_BYTE], 1, out=flags)
        flat = np.flatnonzero(flags.view(np.bool_))  # 0/1 bytes: a valid bool view, scanned faster
        if flat.shape[0] != int(n_rel.sum()):  # pragma: no cover - an invariant, not an input error
            raise AssertionError("relevance bits do not match the class counts")
        rows = np.repeat(np.arange(b, dtype=np.int64), n_rel)
        cols = flat - rows * n
        top = (key[:, :top_k] & 0xFFFFFFFF) >> 1
    elif method == "stable-sort":
        if not bool(torch.isfinite(d).all()):
            raise LandlensError(_NON_FINITE)
        dd = d.clone()
        if rows_e.size:
            dd[torch.from_numpy(rows_e), torch.from_numpy(cols_e)] = float("inf")  # after every finite one
        order = torch.sort(dd, dim=1, stable=True).indices.numpy()
        rel = dl[order] == ql[:, None]
        rel[rows_e, -1] = False
        rows, cols = np.nonzero(rel)
        top = order[:, :top_k]
    else:
        raise ValueError(f"unknown ranking method {method!r}")
    if top_k:
        pos = np.arange(top.shape[1])[None, :]
        top = np.where(pos < size[:, None], top, -1)
    return RankedBlock(rows.astype(np.int64), cols.astype(np.int64) + 1, n_rel, size, top)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: a NaN/inf makes the sum non-finite (exact check only then)."""
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


def _as_tensor(d: Any) -> torch.Tensor:
    return d if isinstance(d, torch.Tensor) else torch.as_tensor(d)


def auto_block(n_db: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Queries per block so that one block of distances to ``n_db`` items stays near ``block_bytes``."""
    return int(max(8, min(4096, block_bytes // max(1, n_db * _BYTES_PER_CELL))))


def _segment_sum(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments of ``values`` (segment i: ``counts[i]`` items from ``starts[i]``)."""
    out = np.zeros(counts.shape[0], dtype=np.float64)
    nonempty = counts > 0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(values, starts[nonempty])
    return out


def _scores_from_ranks(rows: np.ndarray, ranks: np.ndarray, found: np.ndarray, n_relevant: np.ndarray,
                       size: np.ndarray, precision_at: Sequence[int]
                       ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """AP, NMRR and P@k (NaN where G = 0) from the ranks of the relevant items found.

    ``rows``/``ranks`` list each found relevant item (query row, 1-based rank), ordered by row
    then rank; ``found`` counts them per query and ``n_relevant`` is ``G``. Relevant items not
    found (a truncated ranking) add 0 to AP and count ``1.25 K`` in ANMRR. ``size`` is the
    number of ranked results per query. See the module docstring for the definitions.

    Counting is exact integer arithmetic: rows and ranks form one increasing key, so "how
    many relevant ranks are <= t" is a binary search per query.
    """
    found_n = np.asarray(found, dtype=np.int64)
    rows_n = np.asarray(rows, dtype=np.int64)
    rank = np.asarray(ranks, dtype=np.int64)
    g = np.asarray(n_relevant, dtype=np.int64)
    size_n = np.asarray(size, dtype=np.int64)
    b = found_n.shape[0]
    starts = np.concatenate([[0], np.cumsum(found_n)[:-1]]).astype(np.int64)
    none = g == 0
    safe_g = np.maximum(g, 1).astype(np.float64)
    # AP: sum over the found relevant items of (ordinal among them) / rank
    ordinal = np.arange(1, rank.shape[0] + 1, dtype=np.int64) - np.repeat(starts, found_n)
    ap = _segment_sum(ordinal / rank, starts, found_n) / safe_g
    width = int(max(int(size_n.max()) if b else 0, int(rank.max()) if rank.size else 0)) + 2
    key = rows_n * width + rank  # strictly increasing
    row_base = np.arange(b, dtype=np.int64) * width
    prefix = np.concatenate([[0], np.cumsum(rank)])

    def count_upto(limit: np.ndarray) -> np.ndarray:
        """Per query, how many of its found relevant ranks are <= ``limit``."""
        return np.searchsorted(key, row_base + np.minimum(limit, width - 1), side="right") - starts

    # ANMRR (MPEG-7): K = 2G; ranks beyond K, and relevant items not found, count 1.25 K
    k2 = 2 * g
    within = count_upto(k2)
    rank_sum = (prefix[starts + within] - prefix[starts]).astype(np.float64)
    total = rank_sum + (g - within) * 1.25 * k2
    with np.errstate(invalid="ignore", divide="ignore"):
        nmrr = (total / safe_g - 0.5 - g / 2) / np.maximum(1.25 * k2 - 0.5 - g / 2, 1e-12)
    p_at: dict[int, np.ndarray] = {}
    for kk in precision_at:
        cut = np.minimum(size_n, int(kk))
        p_at[kk] = np.where(none, np.nan, count_upto(cut) / np.maximum(cut, 1))
    return np.where(none, np.nan, ap), np.where(none, np.nan, nmrr), p_at


def evaluate_ranking(order_labels: np.ndarray | torch.Tensor, query_labels: np.ndarray | torch.Tensor,
                     n_relevant: np.ndarray | torch.Tensor, precision_at: Sequence[int] = DEFAULT_PRECISION_AT
                     ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """AP, NMRR and P@k from already ranked results (for example an index's top-n lists).

    ``order_labels`` is ``(nq, n)``: the classes of each query's results in rank order; it may
    be truncated (fewer results than the database holds). ``n_relevant`` is ``G`` per query in
    the whole database: relevant items missing from a truncated ranking add 0 to AP and count
    ``1.25 K`` in ANMRR, as MPEG-7 prescribes for items beyond ``K``. P@k is over the first
    ``min(k, n)`` results. Queries with ``G = 0`` get NaN.
    """
    order = np.asarray(order_labels)
    rel = order == np.asarray(query_labels).reshape(-1, 1)
    nq, n = rel.shape
    rows, cols = np.nonzero(rel)
    found = rel.sum(1)
    g = np.asarray(n_relevant, dtype=np.int64).reshape(-1)
    if bool((found > g).any()):
        raise ValueError("a ranking holds more relevant items than n_relevant says exist")
    return _scores_from_ranks(rows, cols + 1, found, g, np.full(nq, n, dtype=np.int64), precision_at)


# ----------------------------------------------------------------------------- evaluation


def evaluate_retrieval(
    query: np.ndarray | torch.Tensor,
    query_labels: np.ndarray | Sequence[int],
    database: np.ndarray | torch.Tensor | None = None,
    database_labels: np.ndarray | Sequence[int] | None = None,
    *,
    metric: str | Distance | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cosine",
    exclude_self: bool | None = None,
    exclude: np.ndarray | Sequence[int] | None = None,
    precision_at: Sequence[int] = DEFAULT_PRECISION_AT,
    classes: Sequence[str] = (),
    confusion_k: int = DEFAULT_CONFUSION_K,
    block: int | None = None,
    method: RankingMethod = "auto",
    symmetric_cache_bytes: int = DEFAULT_SYMMETRIC_CACHE_BYTES,
    warn: bool = True,
) -> RetrievalScores:
    """Rank ``database`` for every query by ``metric`` and score the rankings.

    Args:
        query: ``(nq, D)`` query features (computed in float32).
        query_labels: ``(nq,)`` integer classes.
        database, database_labels: ``(ndb, D)`` and ``(ndb,)``; ``None`` means the queries
            are the database (the ``archive`` protocol), each query leaving itself out.
        metric: a distance name, :class:`~landlens.retrieval.distances.Distance` or function.
        exclude_self: with a database of the queries' length, query ``i`` leaves out
            database item ``i`` (default: True when ``database`` is None).
        exclude: per query, the database index to leave out (``-1``: none); overrides
            ``exclude_self``.
        precision_at: the ``k`` of P@k.
        classes: class names, indexed by label.
        confusion_k: results per query counted in the confusion matrix.
        block: queries per block (default: sized to about 256 MiB of working memory).
        method: the ranking implementation (see :func:`rank_block`); results do not depend on it.
        symmetric_cache_bytes: with ``database=None`` and a symmetric distance, each block of
            distances is computed once and its transpose kept for the later rows, halving the
            distance work; this holds up to ``ndb**2`` bytes (float32 quarter matrix) and is
            used only when that fits (0 disables it).
        warn: issue :class:`NoRelevantWarning` when some queries have no relevant item.
    """
    archive = database is None
    if archive:
        database, database_labels = query, query_labels
        exclude_self = True if exclude_self is None else exclude_self
    if database_labels is None:
        raise ValueError("database_labels are needed with a database")
    distance = get_distance(metric)
    q = torch.as_tensor(np.ascontiguousarray(query) if isinstance(query, np.ndarray) else query).to(torch.float32)
    db = torch.as_tensor(np.ascontiguousarray(database) if isinstance(database, np.ndarray) else database
                         ).to(torch.float32)
    ql = torch.as_tensor(np.asarray(query_labels), dtype=torch.int64).reshape(-1)
    dl = torch.as_tensor(np.asarray(database_labels), dtype=torch.int64).reshape(-1)
    nq, ndb = q.shape[0], db.shape[0]
    if q.ndim != 2 or db.ndim != 2 or ql.shape[0] != nq or dl.shape[0] != ndb:
        raise ValueError(f"shapes do not match: query {tuple(q.shape)}, {ql.shape[0]} labels; "
                         f"database {tuple(db.shape)}, {dl.shape[0]} labels")
    if exclude is not None:
        excl = torch.as_tensor(np.asarray(exclude), dtype=torch.int64).reshape(-1)
        if excl.shape[0] != nq or bool((excl >= ndb).any()):
            raise ValueError("exclude needs one database index (or -1) per query")
    elif exclude_self:
        if ndb != nq:
            raise ValueError("exclude_self needs a database of the queries' length")
        excl = torch.arange(nq, dtype=torch.int64)
    else:
        excl = None
    if nq == 0:
        raise LandlensError("no queries to evaluate")
    smallest = ndb - (0 if excl is None else int(bool((excl >= 0).any())))
    if smallest <= 0:
        raise LandlensError("the retrieval database is empty (nothing left once each query leaves itself out)")
    if any(int(k) < 1 for k in precision_at):
        raise ValueError(f"precision_at values must be >= 1, got {list(precision_at)}")
    precision_at = tuple(dict.fromkeys(int(k) for k in precision_at))
    for what, t in (("query", q), ("database", db)) if not archive else (("query", q),):
        if not _all_finite(t):
            bad = int((~torch.isfinite(t)).any(dim=1).sum())
            raise LandlensError(f"{bad} {what} feature row(s) hold NaN or infinite values "
                                f"(unreadable images? use FeatureSet.only_valid())")
    check = getattr(distance, "check", None)
    if check is not None:
        check(q, "the query features")
        if database is not query:
            check(db, "the database features")
    n_classes = max(len(classes), int(max(int(ql.max()), int(dl.max()))) + 1)
    if int(min(int(ql.min()), int(dl.min()))) < 0:
        raise ValueError("labels must be non-negative integers")
    confusion_k = int(confusion_k)
    bs = int(block) if block else auto_block(ndb)

    threads = max(1, torch.get_num_threads())
    base = distance if isinstance(distance, BaseDistance) else None
    qp = base.prepare(q) if base is not None else q
    dbp = qp if archive else (base.prepare(db) if base is not None else db)
    reuse = archive and base is not None and base.symmetric and ndb * ndb <= symmetric_cache_bytes
    starts = list(range(0, nq, bs))
    stash: dict[int, list[tuple[int, np.ndarray]]] = {i: [] for i in range(len(starts))}
    dl_np = dl.numpy()
    ql_np = ql.numpy()
    ws = _Workspace(min(bs, nq), ndb, dl_np)

    aps, nmrrs, grel, sizes = [], [], [], []
    pats: dict[int, list[np.ndarray]] = {k: [] for k in precision_at}
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    with torch.inference_mode():
        for bi, s in enumerate(starts):
            e = min(nq, s + bs)
            d = ws.dist[:e - s]
            if reuse:
                # d(x, y) = d(y, x): the columns before this block were computed as earlier rows
                right = d[:, s:]
                base.compute(qp[s:e], dbp[s:], out=right)
                rn = right.numpy()
                for bj in range(bi + 1, len(starts)):
                    sj, ej = starts[bj], min(nq, starts[bj] + bs)
                    stash[bj].append((s, rn[:, sj - s:ej - s].copy()))
                dn = d.numpy()
                for si, piece in stash.pop(bi):
                    np.copyto(dn[:, si:si + piece.shape[0]], piece.T)
            elif base is not None:
                base.compute(qp[s:e], dbp, out=d)
            else:
                value = _as_tensor(distance(q[s:e], db))
                if value.dtype == torch.float32 and tuple(value.shape) == tuple(d.shape):
                    d.copy_(value)
                else:
                    d = value
            eb = None if excl is None else excl[s:e].numpy()
            rb = rank_block(d, ql_np[s:e], dl_np, eb, top_k=confusion_k, method=method, threads=threads,
                            workspace=ws)
            ap, nmrr, p_at = _scores_from_ranks(rb.rel_rows, rb.rel_ranks, rb.n_relevant, rb.n_relevant,
                                                rb.database_size, precision_at)
            aps.append(ap)
            nmrrs.append(nmrr)
            grel.append(rb.n_relevant)
            sizes.append(rb.database_size)
            for k in precision_at:
                pats[k].append(p_at[k])
            if confusion_k:
                keep = rb.n_relevant > 0
                top = rb.top_indices[keep]
                top_labels = dl_np[np.maximum(top, 0)]
                q_rep = np.broadcast_to(ql_np[s:e][keep][:, None], top.shape)
                valid = top >= 0
                np.add.at(confusion, (q_rep[valid], top_labels[valid]), 1)
    scores = RetrievalScores(
        ap=np.concatenate(aps),
        nmrr=np.concatenate(nmrrs),
        precision_at={k: np.concatenate(v) for k, v in pats.items()},
        query_labels=ql.numpy(),
        classes=list(classes),
        n_relevant=np.concatenate(grel),
        database_size=np.concatenate(sizes),
        confusion_counts=confusion,
        confusion_k=confusion_k,
    )
    if warn and scores.n_skipped:
        warnings.warn(
            f"{scores.n_skipped} of {scores.n_queries} queries have no relevant item in their database; "
            f"they are left out of mAP, ANMRR, P@k and the class-wise numbers",
            NoRelevantWarning, stacklevel=2,
        )
    return scores


__all__ = [
    "DEFAULT_CONFUSION_K",
    "auto_block",
    "DEFAULT_PRECISION_AT",
    "NoRelevantWarning",
    "RankedBlock",
    "RetrievalScores",
    "evaluate_ranking",
    "evaluate_retrieval",
    "pairwise_distances",
    "rank_block",
]
