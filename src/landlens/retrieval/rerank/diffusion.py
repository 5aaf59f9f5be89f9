"""Diffusion on the k-NN graph of the database, solved by conjugate gradient.

Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on region manifolds: recovering
small objects with compact CNN representations", CVPR 2017, Sec. 3-4: :class:`Diffusion`
(spec ``diffusion[:k=50,kq=10,gamma=3,alpha=0.99,iters=20,tol=1e-6,graph=mutual]``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from landlens.errors import ConfigError
from landlens.retrieval.rerank.base import Reranker, register
from landlens.retrieval.rerank.graph import knn_graph, topk_rows


@register
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
    settings: ClassVar[dict[str, tuple[str, type]]] = {"k": ("k", int), "kq": ("kq", int), "gamma": ("gamma", float), "alpha": ("alpha", float),
                "iters": ("iters", int), "tol": ("tol", float), "graph": ("graph", str)}
    aliases: ClassVar[tuple[str, ...]] = ("dfs",)
    stage = "graph"

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
        v, i = topk_rows(s, self.kq)
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


__all__ = ["Diffusion", "conjugate_gradient"]
