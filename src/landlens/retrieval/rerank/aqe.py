"""alpha-weighted query expansion (alpha-QE), optionally with alpha database-side augmentation.

Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018, Sec. 5: :class:`AlphaQE` (spec ``aqe[:n=2,alpha=3,dba=0]``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from landlens.errors import ConfigError
from landlens.retrieval.rerank.base import Reranker, register
from landlens.retrieval.rerank.graph import knn_graph, topk_rows


@register
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
    settings: ClassVar[dict[str, tuple[str, type]]] = {"n": ("n", int), "alpha": ("alpha", float), "dba": ("dba", int)}
    aliases: ClassVar[tuple[str, ...]] = ("alpha-qe", "alphaqe", "qe")
    stage = "expansion"

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
        v, i = topk_rows(s, self.n)
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


__all__ = ["AlphaQE", "augment"]
