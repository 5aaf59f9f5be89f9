"""``clusterlda``: Fisher discriminants of the archive's own k-means clusters (no label).

Checked against scikit-learn's own PCA / KMeans / LDA.transform for one clustering, on its
hand-worked grid of cluster counts, on what it is for (blobs hidden under louder noise
dimensions come out separated, without their labels), and as the first stage of
``clusterlda+kreciprocal`` (the graph stage sees a database row's query as that row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from landlens.errors import LandlensError
from landlens.retrieval.rerank import ClusterLDA, KReciprocal, RerankPipeline, cluster_grid, make_reranker


def _blobs(seed: int = 0, per: int = 40, classes: int = 4, signal: int = 3, noise: int = 40):
    """``classes`` well-separated blobs in ``signal`` dimensions, under ``noise`` dimensions of
    larger variance: the cosine mostly sees the noise."""
    rng = np.random.default_rng(seed)
    centres = 6.0 * np.eye(classes, signal)  # one signal axis per blob (the last blob at the origin)
    sig = np.concatenate([c + 0.5 * rng.normal(size=(per, signal)) for c in centres])
    x = np.hstack([sig, 2.0 * rng.normal(size=(classes * per, noise))]).astype(np.float32)
    return x, np.repeat(np.arange(classes), per)


def _map(dist: np.ndarray, labels: np.ndarray) -> float:
    aps = []
    for i, row in enumerate(dist):
        keep = np.arange(len(labels)) != i
        aps.append(average_precision_score(labels[keep] == labels[i], -row[keep]))
    return float(np.mean(aps))


def test_cluster_grid_is_geometric_rounded_and_capped():
    # geomspace(12, 96, 7) = 12, 16.97, 24, 33.94, 48, 67.88, 96
    assert cluster_grid(12, 96, 7, 2100) == [12, 17, 24, 34, 48, 68, 96]
    assert cluster_grid(12, 96, 7, 100) == [12, 17, 20]  # at most n // 5
    assert cluster_grid(4, 4, 1, 1000) == [4]
    assert cluster_grid(3, 50, 4, 8) == [2]  # never below 2


def test_one_clustering_equals_sklearn_pca_kmeans_lda():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, _ = _blobs()
    # the rows as the stage gets them: unit length in float32, then float64
    u = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy().astype(np.float64)
    r = ClusterLDA(kmin=5, kmax=5, steps=1, weight=1.5, dim=10, seed=3).fit(x)
    assert r.ks_ == [5]
    pca = PCA(10, random_state=3).fit(u - u.mean(0))
    z = pca.transform(u - u.mean(0))
    ids = KMeans(5, n_init=4, random_state=3).fit_predict(z)
    p = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(z, ids).transform(z)
    ref = np.hstack([u, 1.5 * p / np.linalg.norm(p, axis=1, keepdims=True)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(r.searched_.numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(r.transform(torch.from_numpy(u[:7].astype(np.float32))).numpy(), ref[:7], atol=1e-4)
    d = r.distances(x[:4]).numpy()
    np.testing.assert_allclose(d, 1.0 - ref[:4] @ ref.T, atol=1e-4)


def test_it_finds_the_blobs_under_the_noise_without_labels():
    x, labels = _blobs()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = _map(1.0 - u @ u.T, labels)
    learned = _map(make_reranker("clusterlda:kmin=4,kmax=16,steps=3,dim=20").fit(x).distances(x).numpy(), labels)
    assert cosine < 0.6 and learned > cosine + 0.15, (cosine, learned)  # seed 0: 0.57 -> 0.79


def test_the_graph_stage_gets_the_query_rows_of_the_extended_database():
    x, labels = _blobs(seed=1)
    pipe = make_reranker("clusterlda:kmin=4,kmax=8,steps=2,dim=16+kreciprocal:k1=10,k2=3,lambda=0.2")
    assert isinstance(pipe, RerankPipeline) and isinstance(pipe.expansion, ClusterLDA)
    d = pipe.fit(x).distances(x).numpy()
    ext = pipe.expansion.searched_.numpy()
    ref = KReciprocal(10, 3, 0.2).fit(ext).distances(ext, np.arange(len(x))).numpy()
    np.testing.assert_allclose(d, ref, atol=1e-5)
    assert _map(d, labels) > 0.7


def test_specs_and_refusals():
    r = make_reranker("plda:kmin=4,kmax=8,steps=2,w=1")
    assert isinstance(r, ClusterLDA) and r.spec == "clusterlda:kmin=4,kmax=8,steps=2,weight=1,dim=256,seed=0"
    assert make_reranker(r.spec).spec == r.spec
    for spec, msg in (("clusterlda:kmin=9,kmax=4", "kmin <= kmax"), ("clusterlda:steps=0", "steps=0"),
                      ("clusterlda:weight=-1", "weight=-1"), ("clusterlda:dim=1", "dim=1")):
        with pytest.raises(LandlensError, match=msg):
            make_reranker(spec)
    tiny = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)  # under 10 images: not clustered
    r = make_reranker("clusterlda").fit(tiny)
    u = tiny / np.linalg.norm(tiny, axis=1, keepdims=True)
    assert r.ks_ == [] and np.allclose(r.distances(tiny).numpy(), 1 - u @ u.T, atol=1e-6)
    assert make_reranker("clusterlda").fit(np.vstack([tiny, tiny[:1] + 1])).ks_ == [2]
