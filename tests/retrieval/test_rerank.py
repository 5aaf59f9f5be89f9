"""Unsupervised re-ranking: alpha-QE/DBA, diffusion, k-reciprocal, specs, the evaluation hook, the CLI.

References are hand-worked numbers on tiny hand-built point sets, a dense linear solve for
the diffusion, a direct transcription of Zhong et al.'s published algorithm for the
k-reciprocal distance, and scikit-learn's average precision for the evaluation hook.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from landlens.errors import LandlensError
from landlens.features.store import FeatureSet
from landlens.retrieval.evaluate import evaluate
from landlens.features.fusion import Fusion
from landlens.retrieval.metrics import evaluate_retrieval
from landlens.retrieval.protocols import Protocol
from landlens.retrieval.rerank import AlphaQE, Diffusion, KReciprocal, RerankPipeline, make_reranker


def _angles(degrees) -> np.ndarray:
    """Unit vectors in the plane at the given angles (cosine = cos of the angle between)."""
    t = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------------- alpha-QE

DB5 = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)


def test_alpha_qe_equals_the_hand_computed_expanded_query():
    db = DB5[1:]  # (0.8, 0.6), (0.6, 0.8), (0, 1), (-1, 0); the query (1, 0) is not in it
    r = AlphaQE(n=2, alpha=3).fit(db)
    # neighbours: (0.8, 0.6) with cosine 0.8 and (0.6, 0.8) with 0.6, weights 0.8^3 and 0.6^3
    expanded = _unit([1 + 0.512 * 0.8 + 0.216 * 0.6, 0.512 * 0.6 + 0.216 * 0.8])  # (1.5392, 0.48)
    d = r.distances(np.array([[1.0, 0.0]], np.float32), query_rows=None).numpy()[0]
    np.testing.assert_allclose(d, 1 - db.astype(np.float64) @ expanded, atol=1e-6)
    # alpha = 0 is average query expansion: (q + x1 + x2) / |.|
    d0 = AlphaQE(n=2, alpha=0).fit(db).distances(np.array([[1.0, 0.0]], np.float32), None).numpy()[0]
    np.testing.assert_allclose(d0, 1 - db @ _unit([2.4, 1.4]), atol=1e-6)


def test_alpha_qe_does_not_count_the_query_own_row_twice():
    r = AlphaQE(n=2, alpha=3).fit(DB5)
    q = DB5[:1]  # database row 0
    assert r.query_rows(q).tolist() == [0]
    own = _unit([1 + 0.512 * 0.8 + 0.216 * 0.6, 0.512 * 0.6 + 0.216 * 0.8])  # neighbours rows 1, 2
    np.testing.assert_allclose(r.distances(q).numpy()[0], 1 - DB5 @ own, atol=1e-6)  # found automatically
    np.testing.assert_allclose(r.distances(q, [0]).numpy()[0], 1 - DB5 @ own, atol=1e-6)
    # as an outside query its first neighbour is its own copy (weight 1): q + q + 0.8^3 x1
    outside = _unit([2 + 0.512 * 0.8, 0.512 * 0.6])
    np.testing.assert_allclose(r.distances(q, None).numpy()[0], 1 - DB5 @ outside, atol=1e-6)


def test_alpha_dba_augments_the_database_by_hand():
    r = AlphaQE(n=1, alpha=3, dba=1).fit(DB5)
    # row 0 (1,0): nearest other row 1 (cos 0.8); row 1: nearest other row 2 (cos 0.96)
    a0 = _unit([1 + 0.512 * 0.8, 0.512 * 0.6])
    a1 = _unit([0.8 + 0.96 ** 3 * 0.6, 0.6 + 0.96 ** 3 * 0.8])
    np.testing.assert_allclose(r.searched_[0].numpy(), a0, atol=1e-6)
    np.testing.assert_allclose(r.searched_[1].numpy(), a1, atol=1e-6)
    # row 4 (-1, 0): every other cosine <= 0, weight max(0, s)^3 = 0: unchanged
    np.testing.assert_allclose(r.searched_[4].numpy(), [-1, 0], atol=1e-6)


# ----------------------------------------------------------------------------------- diffusion

PATH = [0, 9, 20, 32, 41, 53]  # degrees: the mutual 2-NN graph is the path 0-1-2-3-4-5


def test_diffusion_graph_and_ranking_equal_a_dense_solve_by_hand():
    x = _angles(PATH)
    r = Diffusion(k=2, kq=2, gamma=3, alpha=0.99, iters=100, tol=1e-12).fit(x)
    a = np.zeros((6, 6))
    for i in range(5):
        a[i, i + 1] = a[i + 1, i] = math.cos(math.radians(PATH[i + 1] - PATH[i])) ** 3
    np.testing.assert_allclose(r.affinity_.toarray(), a, atol=1e-6)
    dm = np.diag(1 / np.sqrt(a.sum(1)))
    s = dm @ a @ dm
    # an outside query at 25 degrees: its 2 nearest are 20 (5 deg) and 32 (7 deg)
    y = np.zeros(6)
    y[2], y[3] = math.cos(math.radians(5)) ** 3, math.cos(math.radians(7)) ** 3
    f = np.linalg.solve(np.eye(6) - 0.99 * s, y)
    d = r.distances(_angles([25]), None).numpy()[0]
    np.testing.assert_allclose(d, -f / f.max(), atol=1e-5)
    assert np.argsort(d, kind="stable").tolist() == np.argsort(-f, kind="stable").tolist()


def _two_chains():
    """Chain A along x (spacing 1) and chain B along y (spacing 0.45) starting 0.95 left of a0.

    The plane is mapped to unit vectors (0.02 p, 1): cosine order = Euclidean order here.
    """
    a = [(t * 1.0, 0.0) for t in range(12)]
    b = [(-0.95, 0.45 * t) for t in range(12)]
    p = np.asarray(a + b) * 0.02
    x = np.concatenate([p, np.ones((24, 1))], axis=1).astype(np.float32)
    return x, np.array([0] * 12 + [1] * 12)


def test_diffusion_follows_the_query_manifold_where_the_cosine_jumps_to_the_other():
    x, labels = _two_chains()
    cos_order = np.argsort(-(x[:1] @ x.T)[0] / np.linalg.norm(x, axis=1), kind="stable")
    assert cos_order[1] == 12  # the nearest neighbour of a0 is b0, on the other chain
    r = Diffusion(k=2, kq=3).fit(x)
    assert r.affinity_[:12, 12:].nnz == 0  # no mutual 2-NN edge between the chains
    d = r.distances(x[:1]).numpy()[0]  # a0 is database row 0 (its own node seeds y)
    order = [i for i in np.argsort(d, kind="stable") if i != 0]
    assert all(labels[i] == 0 for i in order[:10]), order
    ap_diff = evaluate_retrieval(x[:1], labels[:1], x, labels, exclude=[0], metric=lambda q, db: r.distances(q)).ap[0]
    ap_cos = evaluate_retrieval(x[:1], labels[:1], x, labels, exclude=[0], metric="cosine").ap[0]
    assert ap_diff > 0.95 and ap_cos < 0.5, (ap_diff, ap_cos)


# ----------------------------------------------------------------------------------- k-reciprocal

# 0, 7, 16 degrees: class A; 30, 33, 37: class B (denser). Query: node 2 (16 deg), whose
# cosine ranks node 3 (14 deg away, B) above node 0 (16 deg away, A).
KR = [0, 7, 16, 30, 33, 37]


def test_k_reciprocal_jaccard_equals_the_hand_worked_value_and_pulls_the_true_match_up():
    x = _angles(KR)
    r = KReciprocal(k1=2, k2=1, lam=0.3).fit(x)
    # k1 = 2: N(2) = {2, 1, 3}, but N(3) = {3, 4, 5} does not hold 2, so R(2) = {1, 2};
    # R(0) = {0, 1} (N(2) does not hold 0). k1/2 = 1: R(1, 1) = {0, 1} overlaps R(2) in 1 item,
    # not more than 2/3 of 2, so R*(2) = {1, 2}; R*(0) = {0, 1}; R*(3) = {3, 4, 5}.
    e = lambda deg: math.exp(-(1 - math.cos(math.radians(deg))))  # noqa: E731
    v2 = {2: 1 / (1 + e(9)), 1: e(9) / (1 + e(9))}
    v0 = {0: 1 / (1 + e(7)), 1: e(7) / (1 + e(7))}
    both = set(v2) | set(v0)
    jac_20 = 1 - sum(min(v2.get(j, 0), v0.get(j, 0)) for j in both) / sum(max(v2.get(j, 0), v0.get(j, 0))
                                                                        for j in both)
    assert jac_20 == pytest.approx(0.6694, abs=1e-4)
    d = r.distances(x[2:3]).numpy()[0]
    dist = lambda deg: 1 - math.cos(math.radians(deg))  # noqa: E731
    assert d[0] == pytest.approx(0.7 * jac_20 + 0.3 * dist(16), abs=1e-6)
    assert d[3] == pytest.approx(0.7 * 1.0 + 0.3 * dist(14), abs=1e-6)  # nothing shared: d_J = 1
    assert dist(14) < dist(16) and d[0] < d[3]  # the true match now ranks above the false one
    assert sorted(r.features_[2].indices) == [1, 2] and sorted(r.features_[3].indices) == [3, 4, 5]


def _zhong_reference(x: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s published re-ranking loop, transcribed densely (probe = gallery = x), d = 1 - cos."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1 - x @ x.T
    np.fill_diagonal(dist, 0)
    n = len(x)
    rank = np.argsort(dist, axis=1, kind="stable")
    kh = int(np.around(k1 / 2.0))
    v = np.zeros((n, n))
    for i in range(n):
        fwd = rank[i, :k1 + 1]
        kr = fwd[np.where(rank[fwd, :k1 + 1] == i)[0]]
        exp = kr
        for c in kr:
            cf = rank[c, :kh + 1]
            cr = cf[np.where(rank[cf, :kh + 1] == c)[0]]
            if len(np.intersect1d(cr, kr)) > 2 / 3 * len(cr):
                exp = np.append(exp, cr)
        exp = np.unique(exp)
        w = np.exp(-dist[i, exp])
        v[i, exp] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.stack([1 - np.minimum(v[i], v).sum(1) / np.maximum(v[i], v).sum(1) for i in range(n)])
    return (1 - lam) * jac + lam * dist


def test_k_reciprocal_matches_the_published_algorithm_for_database_queries():
    rng = np.random.default_rng(3)
    x = (np.abs(rng.normal(size=(70, 8))) + 0.3 * rng.normal(size=(70, 8))).astype(np.float32)
    for k1, k2 in [(6, 3), (20, 6)]:
        d = KReciprocal(k1=k1, k2=k2, lam=0.3).fit(x).distances(x).numpy()
        np.testing.assert_allclose(d, _zhong_reference(x.astype(np.float64), k1, k2, 0.3), atol=1e-5)


def test_k_reciprocal_outside_query_is_close_to_inserting_it_into_the_collection():
    rng = np.random.default_rng(4)
    x = np.abs(rng.normal(size=(66, 8))).astype(np.float32)
    db, queries = x[:60], x[60:]
    d = KReciprocal(k1=6, k2=3, lam=0.3).fit(db).distances(queries, None).numpy()
    overlap, overlap_cos = [], []
    for i, q in enumerate(queries):
        ref = _zhong_reference(np.concatenate([db, q[None]]).astype(np.float64), 6, 3, 0.3)[-1, :-1]
        top = set(np.argsort(ref)[:10])
        overlap.append(len(top & set(np.argsort(d[i])[:10])) / 10)
        overlap_cos.append(len(top & set(np.argsort(-(db @ q) / np.linalg.norm(db, axis=1))[:10])) / 10)
    assert np.mean(overlap) >= 0.9 and np.mean(overlap) > np.mean(overlap_cos) + 0.1, (overlap, overlap_cos)


# ----------------------------------------------------------------------------------- specs & API


def test_specs_build_the_named_methods_and_read_back():
    r = make_reranker("aqe:n=3,alpha=2.5")
    assert isinstance(r, AlphaQE) and (r.n, r.alpha, r.dba) == (3, 2.5, 0)
    assert r.spec == "aqe:n=3,alpha=2.5,dba=0"
    d = make_reranker("diffusion:k=50,gamma=3,alpha=0.99")
    assert isinstance(d, Diffusion) and (d.k, d.kq, d.gamma, d.alpha, d.graph) == (50, 10, 3.0, 0.99, "mutual")
    k = make_reranker(" kreciprocal : k1=20, k2=6, lambda=0.3 ")
    assert isinstance(k, KReciprocal) and (k.k1, k.k2, k.lam) == (20, 6, 0.3)
    p = make_reranker("aqe+diffusion:k=10")
    assert isinstance(p, RerankPipeline) and isinstance(p.graph, Diffusion) and p.graph.k == 10
    for spec in ("aqe", "diffusion", "kreciprocal", "aqe:dba=2+kreciprocal", "aqe+diffusion:graph=symmetric"):
        r = make_reranker(spec)
        assert make_reranker(r.spec).spec == r.spec


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("rocchio", "unknown method 'rocchio'"),
    ("aqe:m=2", "unknown aqe setting 'm'"),
    ("aqe:n", "is not key=value"),
    ("aqe:n=two", "n='two' is not an integer"),
    ("aqe:n=0", "n=0 must be >= 1"),
    ("diffusion:alpha=1.5", "alpha=1.5 must be in (0, 1)"),
    ("diffusion:graph=dense", "must be 'mutual' or 'symmetric'"),
    ("kreciprocal:lambda=2", "lambda=2.0 must be in [0, 1]"),
    ("diffusion+aqe", "a combination is aqe or clusterlda followed by"),
    ("aqe+aqe", "a combination is aqe or clusterlda followed by"),
    ("aqe+diffusion+kreciprocal", "a combination is aqe or clusterlda followed by"),
    ("aqe+", "empty part"),
    ("aqe:n=2,n=3", "given twice"),
])
def test_bad_specs_raise_one_line_errors(spec, message):
    with pytest.raises(LandlensError) as info:
        make_reranker(spec)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_distance_call_checks_the_database_and_rerank_returns_top_k():
    x = _angles([0, 10, 25, 40, 70, 100])
    r = make_reranker("aqe:n=1").fit(x)
    d = r(torch.from_numpy(x[:2]), torch.from_numpy(x))
    assert tuple(d.shape) == (2, 6)
    with pytest.raises(LandlensError, match="fitted on a database of shape"):
        r(torch.from_numpy(x[:2]), torch.from_numpy(x[:5]))
    with pytest.raises(LandlensError, match="fitted on a database of shape"):
        r(torch.from_numpy(x[:2]), torch.from_numpy(x[::-1].copy()))  # same shape, other content
    dist, idx = r.rerank(x[:2], 3, exclude_self=True)
    assert idx.shape == (2, 3) and 0 not in idx[0] and 1 not in idx[1]
    assert np.all(np.diff(dist, axis=1) >= 0)
    full = r.distances(x[:2]).numpy()
    np.testing.assert_allclose(dist, np.take_along_axis(full, idx, 1))
    with pytest.raises(LandlensError, match="before fit"):
        make_reranker("diffusion").distances(x)


# ----------------------------------------------------------------------------------- evaluation hook


def _clusters(n_per=12, classes=3, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 1.2
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    labels = np.repeat(np.arange(classes), n_per)
    fs = FeatureSet(x, [f"img{i}.png" for i in range(len(x))], labels, [f"c{c}" for c in range(classes)],
                    {"dataset": {"name": "toy"}}, np.ones(len(x), bool))
    return fs, x, labels


def _sklearn_map(dist: np.ndarray, query_labels, db_labels, exclude) -> float:
    from sklearn.metrics import average_precision_score

    aps = []
    for i, row in enumerate(dist):
        keep = np.arange(len(db_labels)) != exclude[i]
        aps.append(average_precision_score(db_labels[keep] == query_labels[i], -row[keep]))
    return float(np.mean(aps))


@pytest.mark.parametrize("spec", ["aqe:n=2", "diffusion:k=5,kq=4", "kreciprocal:k1=5,k2=2", "aqe+kreciprocal:k1=5"])
def test_evaluate_fits_on_the_database_and_scores_like_sklearn(spec):
    fs, x, labels = _clusters()
    n = len(x)
    res = evaluate(fs, protocol=Protocol("archive", "archive-minus-query", np.arange(n), np.arange(n), np.arange(n)),
                   rerank=spec)
    ref = make_reranker(spec).fit(x).distances(x, np.arange(n)).numpy()
    assert res.metrics["mAP"] == pytest.approx(_sklearn_map(ref, labels, labels, np.arange(n)), abs=1e-9)
    assert res.rerank["spec"] == make_reranker(spec).spec and res.rerank["database_size"] == n
    assert res.rerank["query_ms"] >= 0 and "added_query_ms" in res.rerank
    assert res.to_dict()["rerank"]["spec"] == res.rerank["spec"] and res.distance == {"name": "cosine"}
    assert spec.split(":")[0].split("+")[0] in res.to_markdown().splitlines()[2]


def test_evaluate_split_protocols_use_the_right_database_rows():
    fs, x, labels = _clusters(seed=1)
    q = np.arange(0, len(x), 3)  # every third image queries
    # database: the whole archive, each query leaving itself out
    p = Protocol("split", "archive-minus-query", q, np.arange(len(x)), q.copy(), part="test")
    res = evaluate(fs, protocol=p, rerank="diffusion:k=5,kq=3")
    ref = make_reranker("diffusion:k=5,kq=3").fit(x).distances(x[q], q).numpy()
    assert res.metrics["mAP"] == pytest.approx(_sklearn_map(ref, labels[q], labels, q), abs=1e-9)
    # database: the query part only
    p = Protocol("split", "test", q, q.copy(), np.arange(len(q)), part="test")
    res = evaluate(fs, protocol=p, rerank="kreciprocal:k1=4,k2=2")
    ref = make_reranker("kreciprocal:k1=4,k2=2").fit(x[q]).distances(x[q], np.arange(len(q))).numpy()
    assert res.rerank["database_size"] == len(q)
    assert res.metrics["mAP"] == pytest.approx(_sklearn_map(ref, labels[q], labels[q], np.arange(len(q))), abs=1e-9)
    with pytest.raises(LandlensError, match="cosine"):
        evaluate(fs, distance="euclidean", rerank="aqe")


# ----------------------------------------------------------------------------------- whitening


def test_fusion_whitening_has_identity_covariance_and_is_invertible():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10)) + 3.0).astype(np.float32)
    f = Fusion(whiten=True, normalize_blocks=False, eps=0.0).fit([x])
    assert f.components_.shape == (10, 10)
    y = (x - f.mean_) @ f.components_.T / np.sqrt(f.explained_variance_)
    np.testing.assert_allclose(np.cov(y.T), np.eye(10), atol=1e-6)
    np.testing.assert_allclose(f.components_ @ f.components_.T, np.eye(10), atol=1e-10)  # a rotation
    back = (y * np.sqrt(f.explained_variance_)) @ f.components_ + f.mean_
    np.testing.assert_allclose(back, x, atol=1e-5)  # whitening loses nothing before the L2 step
    out = f.transform([x])
    assert out.shape == (400, 10)
    np.testing.assert_allclose(out, y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-5)


# ----------------------------------------------------------------------------------- CLI


def test_cli_rerank_option(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fixtures.make_datasets import make_folder_dataset

    from landlens.cli.common import OneLineErrorGroup
    from landlens.cli.retrieval import retrieval

    data = make_folder_dataset(tmp_path / "data", ["a", "b", "c"], per_class=5, ext=".png", size=32)
    root = OneLineErrorGroup(name="landlens", commands={"retrieval": retrieval})
    base = ["retrieval", "evaluate", str(data), "-b", "lbp_rgb", "--cache-dir", str(tmp_path / "cache"),
            "--workers", "0", "--quiet"]

    def run(*extra):
        args = [*base, *extra]
        monkeypatch.setattr(sys, "argv", ["landlens", *args])
        return CliRunner().invoke(root, args, catch_exceptions=False)

    out = tmp_path / "r.json"
    res = run("--rerank", "kreciprocal:k1=4,k2=2", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "cosine + kreciprocal:k1=4,k2=2,lambda=0.3" in res.output
    assert "rerank  kreciprocal:k1=4,k2=2,lambda=0.3: fitted in" in res.output and "ms/query" in res.output
    doc = json.loads(out.read_text())
    assert doc["rerank"]["spec"] == "kreciprocal:k1=4,k2=2,lambda=0.3" and doc["rerank"]["database_size"] == 15
    assert doc["rerank"]["queries"] == 15
    res = run("--rerank", "aqe:n=zero", "--out", str(out))
    assert res.exit_code == 2 and "error: re-ranking spec 'aqe:n=zero'" in res.output
    res = run("--rerank", "aqe", "--distance", "euclidean", "--out", str(out))
    assert res.exit_code == 2 and "--rerank ranks by cosine" in res.output
