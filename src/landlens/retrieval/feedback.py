"""Relevance feedback: refine a query embedding from images a user marked relevant or not.

Rocchio's method (J. J. Rocchio, "Relevance feedback in information retrieval", 1971; in the
form of Manning, Raghavan & Schütze, *Introduction to Information Retrieval*, 2008, eq. 9.3)
moves the query vector towards the centroid of the images marked relevant and away from the
centroid of those marked not relevant::

    q' = a * q + b * mean(D_r) - c * mean(D_nr)

Here it runs on embeddings: the query and every marked vector are first L2-normalised (so one
image with a large feature norm does not dominate a centroid, and the weights mean the same
for every backbone), and ``q'`` is L2-normalised again, ready for a cosine index. The default
weights are the textbook's reasonable values: **a = 1, b = 0.75, c = 0.15**. An empty set
drops its term (no relevant images: only the push away; no irrelevant ones: only the pull).

Negative components are not clipped: unlike term weights in a text index, embedding
coordinates may have either sign, and a cosine index accepts any vector. The only refused
result is a refined query of (numerically) zero length, which has no direction to search in
(:class:`FeedbackError`).

Rounds: the caller keeps the *original* query and every mark made so far and refines the
original query with all of them each round (the web page does this), so marks accumulate
instead of the query drifting round after round.

Cost: O((1 + |D_r| + |D_nr|) * dim) arithmetic per refinement, plus one ordinary search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from landlens.errors import LandlensError

ROCCHIO_A = 1.0
"""Default weight of the original query (Manning et al. 2008, section 9.1.1)."""

ROCCHIO_B = 0.75
"""Default weight of the centroid of the relevant images."""

ROCCHIO_C = 0.15
"""Default weight of the centroid of the non-relevant images."""

ZERO_NORM = 1e-6
"""A refined query shorter than this (relative to ``a + b + c``) counts as the zero vector."""


class FeedbackError(LandlensError):
    """Relevance feedback that cannot be computed (bad weights, wrong shapes, a zero query)."""


@dataclass(frozen=True)
class RocchioWeights:
    """The weights ``a`` (query), ``b`` (relevant centroid), ``c`` (non-relevant centroid)
    of Rocchio's formula; finite and non-negative, not all zero."""

    a: float = ROCCHIO_A
    b: float = ROCCHIO_B
    c: float = ROCCHIO_C

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise FeedbackError(f"Rocchio weight {name} must be a number, got {value!r}")
            if not math.isfinite(float(value)) or float(value) < 0:
                raise FeedbackError(f"Rocchio weight {name} must be finite and >= 0, got {value!r}")
        if float(self.a) + float(self.b) + float(self.c) == 0:
            raise FeedbackError("Rocchio weights a, b and c are all 0: at least one must be positive")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _unit_rows(x: Any, name: str, dim: int | None) -> np.ndarray:
    """``x`` as an (n, dim) float64 matrix with L2-normalised rows (zero rows stay zero)."""
    m = np.asarray(x, dtype=np.float64)
    if m.size == 0:
        return np.zeros((0, dim or 0), dtype=np.float64)
    m = np.atleast_2d(m)
    if m.ndim != 2:
        raise FeedbackError(f"{name}: expected vectors of shape (n, dim), got shape {m.shape}")
    if dim is not None and m.shape[1] != dim:
        raise FeedbackError(f"{name}: vectors have {m.shape[1]} dimensions, the query has {dim}")
    if not np.isfinite(m).all():
        raise FeedbackError(f"{name}: vectors contain NaN or infinite values")
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)


def rocchio(query: Any, relevant: Any = (), irrelevant: Any = (), *, a: float = ROCCHIO_A,
            b: float = ROCCHIO_B, c: float = ROCCHIO_C, scale: float = 1.0) -> np.ndarray:
    """Rocchio's refined query ``q' = a q + b mean(relevant) - c mean(irrelevant)`` (eq. 9.3 of
    Manning, Raghavan & Schütze 2008) on L2-normalised vectors, L2-normalised again.

    Args:
        query: the query embedding, shape (dim,) (or (1, dim)).
        relevant: embeddings marked relevant, shape (n_r, dim); may be empty.
        irrelevant: embeddings marked not relevant, shape (n_nr, dim); may be empty.
        a, b, c: Rocchio weights (defaults 1, 0.75, 0.15), finite and non-negative.
        scale: length of the returned vector: 1 (unit, for a cosine index), or e.g. the
            query's own norm for a Euclidean index over raw features.

    Returns:
        The refined query, shape (dim,), float32, of length ``scale``.

    Raises:
        FeedbackError: bad weights, mismatched shapes, non-finite values, a zero query
            vector, or a refined query of zero length (the terms cancel out).
    """
    w = RocchioWeights(a, b, c)
    q = np.asarray(query, dtype=np.float64)
    if q.ndim == 2 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 1 or q.size == 0:
        raise FeedbackError(f"query: expected one vector of shape (dim,), got shape {q.shape}")
    if not np.isfinite(q).all():
        raise FeedbackError("query: the vector contains NaN or infinite values")
    qn = float(np.linalg.norm(q))
    if qn == 0:
        raise FeedbackError("query: the query vector is all zeros, so it has no direction to refine")
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise FeedbackError(f"scale must be finite and > 0, got {scale!r}")
    dim = q.shape[0]
    rel = _unit_rows(relevant, "relevant", dim)
    irr = _unit_rows(irrelevant, "irrelevant", dim)
    out = float(w.a) * (q / qn)
    if len(rel):
        out = out + float(w.b) * rel.mean(axis=0)
    if len(irr):
        out = out - float(w.c) * irr.mean(axis=0)
    norm = float(np.linalg.norm(out))
    if norm <= ZERO_NORM * (float(w.a) + float(w.b) + float(w.c)):
        raise FeedbackError("the refined query is the zero vector (its terms cancel out); "
                            "mark other images or change the weights")
    return (out * (float(scale) / norm)).astype(np.float32)


def rocchio_weights(weights: RocchioWeights | dict[str, Any] | Sequence[float] | None) -> RocchioWeights:
    """Weights from ``None`` (defaults), a mapping with keys ``a``/``b``/``c`` (missing keys
    take their defaults), a ``(a, b, c)`` sequence, or a :class:`RocchioWeights`."""
    if weights is None:
        return RocchioWeights()
    if isinstance(weights, RocchioWeights):
        return weights
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - {"a", "b", "c"})
        if unknown:
            raise FeedbackError(f"unknown Rocchio weight(s) {', '.join(map(repr, unknown))}: use a, b, c")
        return RocchioWeights(**weights)
    values = list(weights)
    if len(values) != 3:
        raise FeedbackError(f"Rocchio weights: give three numbers a, b, c, got {len(values)}")
    return RocchioWeights(*values)


__all__ = [
    "ROCCHIO_A",
    "ROCCHIO_B",
    "ROCCHIO_C",
    "FeedbackError",
    "RocchioWeights",
    "rocchio",
    "rocchio_weights",
]
