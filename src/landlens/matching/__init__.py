"""Residual-dyad image matching (Khurshid et al.): autoencoder features, a learned pair discriminator, fast scoring."""

from __future__ import annotations

from landlens.matching.scoring import learned as _learned
from landlens.retrieval.distances import available_distances as _available, register_distance as _register

if "learned" not in _available():
    _register("learned", _learned)
