"""k-reciprocal re-ranking with the Jaccard distance.

Zhong, Zheng, Cao & Li, "Re-ranking person re-identification with k-reciprocal encoding",
CVPR 2017, Sec. 3: :class:`KReciprocal` (spec ``kreciprocal[:k1=20,k2=6,lambda=0.3]``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from landlens.errors import ConfigError
from landlens.retrieval.rerank.base import Reranker, pack_csr, register, unpack_csr
from landlens.retrieval.rerank.graph import knn_graph, topk_rows

#: Candidate pairs processed at once by the k-reciprocal Jaccard distance.
PAIR_CHUNK = 1 << 22


@register
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
    settings: ClassVar[dict[str, tuple[str, type]]] = {"k1": ("k1", int), "k2": ("k2", int), "lambda": ("lam", float), "lam": ("lam", float)}
    aliases: ClassVar[tuple[str, ...]] = ("k-reciprocal", "krr", "kr")
    stage = "graph"

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

    def _neighbours(self, n: int) -> tuple[int, int]:
        """k1 and k1 / 2 as a database of ``n`` images allows (at most n - 1 others)."""
        return min(self.k1, n - 1), min(self.k_half, n - 1)

    def _fit(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.searched_ = x
        k1, kh = self._neighbours(n)
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
        self._expand()
        k2 = self._k2
        self.k2_similarity_ = others[:, k2 - 2] if k2 >= 2 else np.full(n, np.inf, np.float32)

    def _state(self) -> dict[str, np.ndarray]:
        return {"ranks": self.ranks_, "kth_similarity": self.kth_similarity_,
                "half_kth_similarity": self.half_kth_similarity_, "k2_similarity": self.k2_similarity_, "row_mass": self.row_mass_,
                **pack_csr("half_sets", self.half_sets_), **pack_csr("raw_features", self.raw_features_)}

    def _load(self, x: torch.Tensor, state: dict[str, np.ndarray]) -> None:
        self.searched_ = x
        self.ranks_ = state["ranks"]
        self._k1, self._kh = self._neighbours(x.shape[0])
        self.kth_similarity_, self.half_kth_similarity_ = state["kth_similarity"], state["half_kth_similarity"]
        self.k2_similarity_, self.row_mass_ = state["k2_similarity"], state["row_mass"]
        self.half_sets_, self.raw_features_ = unpack_csr(state, "half_sets"), unpack_csr(state, "raw_features")
        self._expand()

    def _expand(self) -> None:
        """The local query expansion (eq. 11): the mean of V over N(g, k2) (g and its k2 - 1
        nearest), and the matrix forms the scoring reads."""
        n = self.ranks_.shape[0]
        self._k2 = k2 = min(self.k2, self.ranks_.shape[1])
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
            top = topk_rows(s, max(self._k1, self._k2 - 1))[1].numpy()
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


__all__ = ["PAIR_CHUNK", "KReciprocal", "jaccard_min_sums"]
