"""Retrieval metrics of the remote-sensing literature, vectorised over queries and database.

Each query's database is ranked by ascending distance; an item is relevant when it has the
query's class. With the ``archive`` protocol every image queries all the others (itself
excluded). Ties in distance are broken by database order (stable sort), so results are exact
and repeatable.

- AP (average precision): mean over the relevant items of the precision at their rank;
  mAP is its mean over queries.
- P@k: fraction of the first k results that are relevant.
- ANMRR (MPEG-7, Manjunath et al. 2001): with G(q) relevant items, K(q) = 2 G(q) (the
  common remote-sensing choice), Rank(k) = rank if <= K(q) else 1.25 K(q);
  AVR = sum Rank / G; MRR = AVR - 0.5 - G/2; NMRR = MRR / (1.25 K - 0.5 - G/2);
  ANMRR = mean NMRR (0 is perfect, 1 is worst).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

DEFAULT_PRECISION_AT = (5, 10, 50, 100, 1000)


@dataclass
class RetrievalScores:
    """Per-query scores; the summary means are properties."""

    ap: np.ndarray
    nmrr: np.ndarray
    precision_at: dict[int, np.ndarray]
    query_labels: np.ndarray
    classes: list[str] = field(default_factory=list)

    @property
    def map(self) -> float:
        return float(self.ap.mean())

    @property
    def anmrr(self) -> float:
        return float(self.nmrr.mean())

    def classwise_map(self) -> dict[str, float]:
        out = {}
        for c in np.unique(self.query_labels):
            name = self.classes[c] if c < len(self.classes) else str(c)
            out[name] = float(self.ap[self.query_labels == c].mean())
        return out

    def summary(self) -> dict[str, float]:
        d = {"mAP": self.map, "ANMRR": self.anmrr}
        for k, v in self.precision_at.items():
            d[f"P@{k}"] = float(v.mean())
        return d


def pairwise_distances(q: torch.Tensor, db: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Distances (nq, ndb) between rows of ``q`` and ``db``."""
    if metric == "cosine":
        qn = torch.nn.functional.normalize(q, dim=1)
        dn = torch.nn.functional.normalize(db, dim=1)
        return 1.0 - qn @ dn.T
    if metric == "euclidean":
        return torch.cdist(q, db)
    if metric in ("manhattan", "l1"):
        return torch.cdist(q, db, p=1)
    raise ValueError(f"unknown distance {metric!r}")


def evaluate_ranking(order_labels: torch.Tensor, query_labels: torch.Tensor, n_relevant: torch.Tensor,
                     precision_at: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Scores from the labels of each query's ranked database (nq, ndb)."""
    rel = (order_labels == query_labels[:, None]).to(torch.float64)
    ndb = rel.shape[1]
    ranks = torch.arange(1, ndb + 1, dtype=torch.float64)
    hits = rel.cumsum(1)
    g = n_relevant.to(torch.float64)
    safe_g = g.clamp(min=1)
    ap = (hits / ranks * rel).sum(1) / safe_g
    # ANMRR, K = 2G
    k = 2.0 * g
    rank_or_penalty = torch.where(ranks[None, :] <= k[:, None], ranks[None, :], 1.25 * k[:, None])
    avr = (rank_or_penalty * rel).sum(1)
    # relevant items never retrieved (cannot happen with a full ranking) would count 1.25 K
    avr = (avr + (g - rel.sum(1)) * 1.25 * k) / safe_g
    mrr = avr - 0.5 - g / 2
    nmrr = mrr / (1.25 * k - 0.5 - g / 2)
    p_at = {kk: hits[:, min(kk, ndb) - 1] / min(kk, ndb) for kk in precision_at}
    return ap, nmrr, p_at


def evaluate_retrieval(
    query: np.ndarray,
    query_labels: np.ndarray,
    database: np.ndarray | None = None,
    database_labels: np.ndarray | None = None,
    *,
    metric: str = "cosine",
    exclude_self: bool | None = None,
    precision_at: Sequence[int] = DEFAULT_PRECISION_AT,
    classes: Sequence[str] = (),
    block: int = 512,
) -> RetrievalScores:
    """Rank ``database`` for every query and score it.

    With ``database=None`` the queries are the database (``archive`` protocol) and each
    query's own row is excluded.
    """
    archive = database is None
    if archive:
        database, database_labels = query, query_labels
        exclude_self = True if exclude_self is None else exclude_self
    assert database is not None and database_labels is not None
    q = torch.as_tensor(np.ascontiguousarray(query), dtype=torch.float32)
    db = torch.as_tensor(np.ascontiguousarray(database), dtype=torch.float32)
    ql = torch.as_tensor(np.asarray(query_labels), dtype=torch.int64)
    dl = torch.as_tensor(np.asarray(database_labels), dtype=torch.int64)
    counts = torch.bincount(dl, minlength=int(max(ql.max(), dl.max())) + 1)
    aps, nmrrs, pats = [], [], {k: [] for k in precision_at}
    for s in range(0, q.shape[0], block):
        qb, lb = q[s:s + block], ql[s:s + block]
        d = pairwise_distances(qb, db, metric)
        n_rel = counts[lb].clone()
        if exclude_self:
            rows = torch.arange(qb.shape[0])
            d[rows, rows + s] = float("inf")
            n_rel -= 1
        order = torch.sort(d, dim=1, stable=True).indices
        if exclude_self:
            order = order[:, :-1]  # the query itself, pushed last by its infinite distance
        ap, nmrr, p_at = evaluate_ranking(dl[order], lb, n_rel, precision_at)
        aps.append(ap)
        nmrrs.append(nmrr)
        for k in precision_at:
            pats[k].append(p_at[k])
    return RetrievalScores(
        ap=torch.cat(aps).numpy(),
        nmrr=torch.cat(nmrrs).numpy(),
        precision_at={k: torch.cat(v).numpy() for k, v in pats.items()},
        query_labels=ql.numpy(),
        classes=list(classes),
    )


__all__ = ["DEFAULT_PRECISION_AT", "RetrievalScores", "evaluate_ranking", "evaluate_retrieval", "pairwise_distances"]
