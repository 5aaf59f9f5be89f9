"""Unsupervised re-ranking of retrieval results: alpha-QE (+ alpha-DBA), cluster projections,
diffusion, k-reciprocal.

Every method here uses no label: it looks only at the database's features (the k-NN graph
of the archive) and at the query. The base similarity is the cosine, i.e. the dot product
of L2-normalised features (the features are normalised on entry, whatever they were).

============  ===============================================================================
spec          method
============  ===============================================================================
aqe           alpha-weighted query expansion, optionally with alpha database-side
              augmentation (Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with
              no human annotation", TPAMI 2018, Sec. 5): :class:`AlphaQE` (``aqe.py``)
clusterlda    the features extended by Fisher discriminants of the archive's own k-means
              clusters at several granularities (pseudo-label metric learning, no label):
              :class:`ClusterLDA` (``clusters.py``)
diffusion     diffusion on the mutual k-NN graph solved by conjugate gradient (Iscen, Tolias,
              Avrithis, Furon & Chum, "Efficient diffusion on region manifolds", CVPR 2017,
              Sec. 3-4): :class:`Diffusion` (``diffusion.py``)
kreciprocal   k-reciprocal encoding with the Jaccard distance (Zhong, Zheng, Cao & Li,
              "Re-ranking person re-identification with k-reciprocal encoding", CVPR 2017,
              Sec. 3): :class:`KReciprocal` (``kreciprocal.py``)
============  ===============================================================================

The base class, the per-block binding used by evaluation, the aqe+graph pipeline and the spec
reader are in ``base.py``; the database's k-NN graph (FAISS) in ``graph.py``.

A re-ranker is an estimator in the scikit-learn style: the settings go to ``__init__``,
:meth:`Reranker.fit` learns from the database (attributes ending in ``_``), and then it is

- a distance for :func:`landlens.retrieval.metrics.evaluate_retrieval`: ``r(q_block, db)``
  returns ``(b, n)`` distances (smaller = closer) and checks that ``db`` is the database it
  was fitted on; :meth:`Reranker.bind` gives the per-block form that knows which database
  row each query is (what :func:`landlens.retrieval.evaluate.evaluate` uses);
- a search: :meth:`Reranker.rerank` returns the top-k ``(distances, indices)``.

:func:`make_reranker` builds one from a short spec such as ``"aqe:n=2,alpha=3"``,
``"diffusion:k=50,gamma=3,alpha=0.99"``, ``"kreciprocal:k1=20,k2=6,lambda=0.3"`` or a
combination ``"aqe+diffusion"`` / ``"clusterlda+kreciprocal"`` (the expansion first, then the
graph method on the expanded query and the database the expansion searches: augmented with
``dba``, extended by ``clusterlda``).

Queries that are database rows (the ``archive`` protocol, or searching by an archive
image): the query's own row is found by its exact feature bytes (or given as
``query_rows``). alpha-QE and alpha-DBA leave that row out of the neighbours they add (the
query already counts once); diffusion and k-reciprocal re-ranking use the query's own node
of the graph, as the methods do when the query belongs to the collection. Evaluation then
leaves the query's own row out of its ranking, as for any distance.

Cost: fitting builds the k-NN lists of the database with FAISS's exact search (never an
``n x n`` matrix: memory ``O(n k)`` plus FAISS's fixed blocks); a query costs one similarity
row to the database plus, for diffusion, ``iters`` sparse products with the ``O(n k)``-edge
graph, and, for k-reciprocal, sparse set operations over its candidate lists.
"""

from __future__ import annotations

# importing a method's module registers it with make_reranker, in this (alphabetical) order: aqe,
# clusterlda, diffusion, kreciprocal (the order `make_reranker` lists them in its messages)
from landlens.retrieval.rerank.aqe import AlphaQE, augment
from landlens.retrieval.rerank.base import (
    SPEC_HELP,
    BoundReranker,
    Reranker,
    RerankPipeline,
    make_reranker,
)
from landlens.retrieval.rerank.clusters import ClusterLDA, cluster_grid
from landlens.retrieval.rerank.diffusion import Diffusion, conjugate_gradient
from landlens.retrieval.rerank.graph import knn_graph, topk_rows
from landlens.retrieval.rerank.kreciprocal import KReciprocal, jaccard_min_sums

DEFAULT_RERANK = "clusterlda:kmin=24,kmax=96,steps=5,weight=1+kreciprocal:k1=80,k2=6,lambda=0.1"
"""The re-ranking archives get by default (``rerank="auto"``): cluster projections, then k-reciprocal
re-ranking. k-reciprocal's settings were chosen on UC Merced val queries
(benchmarks/results/retrieval_quality_unsupervised_after_spine.md), the cluster grid and weight on
the val queries of the default ``fusion`` (benchmarks/results/cluster_projection.md: UC Merced
85.41 -> 89.68 val mAP, archive 84.50 -> 89.37; checked on EuroSAT's val queries, 69.32 -> 74.02)."""
AUTO_RERANK_MAX_IMAGES = 50_000
"""``rerank="auto"`` re-ranks archives up to this size: it is fitted once per archive generation
(UC Merced's 2,100 fused vectors: about 8-18 s on 2 cores; EuroSAT's 27,000: 199 s to fit it and
rank every image, benchmarks/results/default_pipeline.md; growing with the square of the size)."""


def archive_rerank(spec: str | None, n_images: int, metric: str) -> str | None:
    """The default re-ranking an archive records: ``"auto"`` gives :data:`DEFAULT_RERANK` for a
    cosine archive of at most :data:`AUTO_RERANK_MAX_IMAGES` images, else none; ``None`` or
    ``"none"`` none; any other spec is checked (:func:`make_reranker`) and kept."""
    from landlens.errors import ConfigError

    if spec is None or str(spec).strip().lower() == "none":
        return None
    if str(spec).strip().lower() == "auto":
        return DEFAULT_RERANK if metric == "cosine" and n_images <= AUTO_RERANK_MAX_IMAGES else None
    if metric != "cosine":
        raise ConfigError(f"re-ranking {spec!r} needs the cosine metric; this archive uses {metric}")
    make_reranker(spec)
    return str(spec)


__all__ = [
    "AUTO_RERANK_MAX_IMAGES",
    "DEFAULT_RERANK",
    "SPEC_HELP",
    "AlphaQE",
    "BoundReranker",
    "ClusterLDA",
    "Diffusion",
    "KReciprocal",
    "RerankPipeline",
    "Reranker",
    "archive_rerank",
    "augment",
    "cluster_grid",
    "conjugate_gradient",
    "jaccard_min_sums",
    "knn_graph",
    "make_reranker",
    "topk_rows",
]
