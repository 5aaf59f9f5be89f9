"""What the in-RAM indexes (:mod:`landlens.retrieval.index`) and the on-disk index
(:mod:`landlens.retrieval.ondisk`) share: the FAISS module, the metrics, the size of PQ codes and
how an inverted file is probed."""

from __future__ import annotations

from typing import Any

METRICS = ("cosine", "euclidean")

QUANTIZER_EF_SEARCH = 64
"""Beam width of an HNSW coarse quantizer (at least ``2 * nprobe``)."""


def faiss_module():  # noqa: ANN201 - the faiss module, imported on first use
    import faiss

    return faiss


def default_pq_m(dim: int) -> int:
    """Sub-quantisers of the PQ codes: the largest divisor of ``dim`` that is at most 64 and
    leaves at least 8 dimensions per sub-quantiser (e.g. 64 for 1280, 32 for 256, 8 for 64;
    FAISS k-means is slow on 4-d sub-vectors)."""
    best = 1
    for m in range(1, min(64, dim // 8) + 1):
        if dim % m == 0:
            best = m
    return best


def set_ivf_probes(index: Any, nprobe: int) -> None:
    """Visit ``nprobe`` lists (at most all) per query of the inverted file inside ``index``, if
    any; an HNSW coarse quantiser searches with beam width ``max(QUANTIZER_EF_SEARCH, 2 * nprobe)``."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
        coarse = faiss.downcast_index(ivf.quantizer)
        if hasattr(coarse, "hnsw"):
            coarse.hnsw.efSearch = int(max(QUANTIZER_EF_SEARCH, 2 * ivf.nprobe))


__all__ = ["METRICS", "QUANTIZER_EF_SEARCH", "default_pq_m", "faiss_module", "set_ivf_probes"]
