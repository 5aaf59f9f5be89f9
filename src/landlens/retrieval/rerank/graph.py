"""The k-NN graph of a database, shared by the re-rankers that learn from it.

:func:`knn_graph` builds each row's list of most similar other rows by blocks of matrix
products (never an ``n x n`` matrix); :func:`topk_rows` is the query side: the best ``k``
columns of a similarity block the re-ranker holds anyway.
"""

from __future__ import annotations

import torch

#: Elements of a (rows x database) similarity block held at once while building k-NN lists.
BLOCK_ELEMENTS = 1 << 25


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


def topk_rows(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of every row of ``s`` (``k`` capped at the row length):
    ``(values, columns)`` in decreasing order."""
    k = max(0, min(int(k), s.shape[1]))
    return torch.topk(s, k, dim=1)


__all__ = ["BLOCK_ELEMENTS", "knn_graph", "topk_rows"]
