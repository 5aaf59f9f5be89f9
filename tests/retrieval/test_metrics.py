"""Retrieval metrics against hand-computed values and a plain-Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from landlens.retrieval.metrics import evaluate_retrieval


def _reference(dist_row: np.ndarray, db_labels: np.ndarray, q_label: int, ks=(1, 2, 5)):
    """Straightforward per-query definitions (MPEG-7 ANMRR with K = 2G)."""
    order = sorted(range(len(dist_row)), key=lambda j: (dist_row[j], j))
    rel = [int(db_labels[j] == q_label) for j in order]
    g = sum(rel)
    hits, precisions = 0, []
    for r, x in enumerate(rel, start=1):
        if x:
            hits += 1
            precisions.append(hits / r)
    ap = sum(precisions) / g
    k = 2 * g
    ranks = [r if r <= k else 1.25 * k for r, x in enumerate(rel, start=1) if x]
    avr = sum(ranks) / g
    nmrr = (avr - 0.5 - g / 2) / (1.25 * k - 0.5 - g / 2)
    p = {kk: sum(rel[:kk]) / kk for kk in ks}
    return ap, nmrr, p


def test_hand_computed_ranking():
    # one query (label 1) and a database whose distances put labels in the order 1,0,1,0,0,1
    q = np.array([[0.0]])
    db = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    dbl = np.array([1, 0, 1, 0, 0, 1])
    s = evaluate_retrieval(q, np.array([1]), db, dbl, metric="euclidean", precision_at=(1, 2, 5))
    assert s.map == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 3)
    # ANMRR: G=3, K=6, ranks 1,3,6: AVR=10/3, MRR=10/3-2, NMRR=MRR/(7.5-2)
    assert s.anmrr == pytest.approx((10 / 3 - 2) / 5.5)
    assert s.precision_at[1][0] == 1.0 and s.precision_at[2][0] == 0.5 and s.precision_at[5][0] == pytest.approx(0.4)


def test_anmrr_penalises_late_hits():
    # G=1, K=2: the only relevant item at rank 4 counts as 1.25K = 2.5 -> NMRR = (2.5-1)/(2.5-1) = 1
    q = np.array([[0.0]])
    db = np.array([[1.0], [2.0], [3.0], [4.0]])
    s = evaluate_retrieval(q, np.array([1]), db, np.array([0, 0, 0, 1]), metric="euclidean", precision_at=(1,))
    assert s.anmrr == pytest.approx(1.0)
    s = evaluate_retrieval(q, np.array([1]), db, np.array([1, 0, 0, 0]), metric="euclidean", precision_at=(1,))
    assert s.anmrr == pytest.approx(0.0)
    assert s.map == 1.0


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_archive_protocol_matches_reference(metric):
    rng = np.random.default_rng(0)
    n, d = 60, 8
    labels = rng.integers(0, 4, n)
    x = rng.normal(size=(n, d)) + labels[:, None] * 0.7
    s = evaluate_retrieval(x, labels, metric=metric, precision_at=(1, 2, 5), block=7)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        if metric == "euclidean":
            dist = np.linalg.norm(x[others] - x[i], axis=1)
        elif metric == "manhattan":
            dist = np.abs(x[others] - x[i]).sum(1)
        else:
            a = x[i] / np.linalg.norm(x[i])
            b = x[others] / np.linalg.norm(x[others], axis=1, keepdims=True)
            dist = 1 - b @ a
        ap, nmrr, p = _reference(dist, labels[others], labels[i])
        assert math.isclose(s.ap[i], ap, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(s.nmrr[i], nmrr, rel_tol=1e-6, abs_tol=1e-9)
        for k in (1, 2, 5):
            assert math.isclose(s.precision_at[k][i], p[k])
    cw = s.classwise_map()
    assert set(cw) == {str(c) for c in np.unique(labels)}
    assert np.mean([s.ap[labels == c].mean() for c in np.unique(labels)]) == pytest.approx(np.mean(list(cw.values())))


def test_perfect_and_random_separation():
    labels = np.repeat(np.arange(5), 20)
    perfect = np.eye(5)[labels] + 1e-3 * np.random.default_rng(1).normal(size=(100, 5))
    s = evaluate_retrieval(perfect, labels)
    assert s.map == pytest.approx(1.0) and s.anmrr == pytest.approx(0.0, abs=1e-12)
    noise = np.random.default_rng(2).normal(size=(100, 16))
    r = evaluate_retrieval(noise, labels)
    assert 0.1 < r.map < 0.35  # chance level is about 19/99


# --------------------------------------------------------------------------- hardened metrics

import warnings  # noqa: E402

import torch  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402

from landlens.errors import LandlensError  # noqa: E402
from landlens.retrieval.metrics import NoRelevantWarning, evaluate_ranking  # noqa: E402


def _matrix_distance(m: np.ndarray, dtype=torch.float32):
    """A distance that looks up a fixed (nq, ndb) matrix: features are row/column ids."""

    def lookup(q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(m[q[:, 0].long().numpy()][:, db[:, 0].long().numpy()], dtype=dtype)

    return lookup


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ap_equals_sklearn_on_untied_random_rankings(dtype):
    rng = np.random.default_rng(10)
    nq, ndb = 300, 157
    # distinct distances per row (a permutation), exact in float32
    m = np.stack([rng.permutation(ndb) + 0.5 for _ in range(nq)])
    ql = rng.integers(0, 6, nq)
    dl = rng.integers(0, 6, ndb)
    q = np.arange(nq, dtype=np.float32)[:, None]
    db = np.arange(ndb, dtype=np.float32)[:, None]
    s = evaluate_retrieval(q, ql, db, dl, metric=_matrix_distance(m, dtype), exclude_self=False,
                           precision_at=(1, 7, 1000), block=37)
    for i in range(nq):
        y = dl == ql[i]
        if not y.any():
            assert np.isnan(s.ap[i])
            continue
        assert s.ap[i] == pytest.approx(average_precision_score(y, -m[i]), abs=1e-12)
        order = np.argsort(m[i], kind="stable")
        assert s.precision_at[7][i] == pytest.approx(y[order[:7]].mean(), abs=1e-12)
        assert s.precision_at[1000][i] == pytest.approx(y.mean(), abs=1e-12)  # k > N: over all N


def test_anmrr_hand_worked_cases():
    q = np.array([[0.0]])
    db = np.arange(1.0, 11.0)[:, None]  # distances 1..10 -> ranks 1..10

    def nmrr(relevant_ranks):
        labels = np.zeros(10, int)
        labels[np.asarray(relevant_ranks) - 1] = 1
        return evaluate_retrieval(q, np.array([1]), db, labels, metric="euclidean", precision_at=(1,)).anmrr

    assert nmrr([1, 2, 3]) == pytest.approx(0.0, abs=1e-15)  # all relevant first
    assert nmrr([8, 9, 10]) == pytest.approx(1.0, abs=1e-15)  # G=3, K=6: none within K
    # G=2, K=4, ranks 2 and 5 -> Rank 2 and 1.25*4=5; AVR 3.5; MRR 2; NMRR 2/(5-0.5-1)
    assert nmrr([2, 5]) == pytest.approx(2 / 3.5, abs=1e-15)
    # G=1, K=2, rank 2: AVR 2, MRR 2-0.5-0.5 = 1, NMRR 1/(2.5-0.5-0.5)
    assert nmrr([2]) == pytest.approx(1 / 1.5, abs=1e-15)


def test_precision_at_k_and_k_beyond_the_database():
    q = np.array([[0.0]])
    db = np.arange(1.0, 5.0)[:, None]
    s = evaluate_retrieval(q, np.array([1]), db, np.array([0, 1, 1, 0]), metric="euclidean",
                           precision_at=(1, 2, 3, 4, 10))
    got = {k: float(v[0]) for k, v in s.precision_at.items()}
    assert got == {1: 0.0, 2: 0.5, 3: pytest.approx(2 / 3), 4: 0.5, 10: 0.5}
    assert s.truncated_precision_at == [10]
    assert s.to_dict()["precision_at"]["truncated_to_database_size"] == [10]


@pytest.mark.parametrize("method", ["packed", "stable-sort"])
def test_ties_rank_the_lower_database_index_first(method):
    q = np.array([[0.0]], dtype=np.float32)
    db = np.array([[1.0], [-1.0]], dtype=np.float32)  # both at distance exactly 1
    first_relevant = evaluate_retrieval(q, np.array([1]), db, np.array([1, 0]), metric="euclidean",
                                        precision_at=(1,), method=method)
    second_relevant = evaluate_retrieval(q, np.array([1]), db, np.array([0, 1]), metric="euclidean",
                                         precision_at=(1,), method=method)
    assert first_relevant.map == 1.0 and first_relevant.precision_at[1][0] == 1.0
    assert second_relevant.map == 0.5 and second_relevant.precision_at[1][0] == 0.0
    # the same ranking drives the confusion matrix: top-1 is database item 0
    c = evaluate_retrieval(q, np.array([1]), db, np.array([0, 1]), metric="euclidean", precision_at=(1,),
                           confusion_k=1, method=method)
    assert c.confusion_counts[1].tolist() == [1, 0]


@pytest.mark.parametrize("metric", ["euclidean", "manhattan"])
def test_heavy_ties_match_the_reference_order(metric):
    rng = np.random.default_rng(11)
    n = 90
    labels = rng.integers(0, 3, n)
    x = rng.integers(0, 3, size=(n, 2)).astype(np.float32)  # 9 distinct points: ties everywhere
    results = [evaluate_retrieval(x, labels, metric=metric, precision_at=(1, 2, 5), method=m, block=b)
               for m, b in (("packed", 16), ("stable-sort", 7), ("packed", None))]
    for i in range(n):
        others = [j for j in range(n) if j != i]
        diff = x[others].astype(np.float64) - x[i]
        dist = np.sqrt((diff**2).sum(1)) if metric == "euclidean" else np.abs(diff).sum(1)
        ap, nmrr, p = _reference(dist, labels[others], labels[i])
        for s in results:
            assert s.ap[i] == pytest.approx(ap, abs=1e-12)
            assert s.nmrr[i] == pytest.approx(nmrr, abs=1e-12)
            assert all(s.precision_at[k][i] == pytest.approx(p[k]) for k in (1, 2, 5))


def test_negative_distances_rank_correctly():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 40)

    def neg_dot(q, db):
        return -(q @ db.T)

    a = evaluate_retrieval(x, labels, metric=neg_dot, method="packed")
    b = evaluate_retrieval(x, labels, metric=neg_dot, method="stable-sort")
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=0)
    m = -(x.astype(np.float64) @ x.T.astype(np.float64))
    for i in range(40):
        others = [j for j in range(40) if j != i]
        ap, _, _ = _reference(m[i, others], labels[others], labels[i])
        assert a.ap[i] == pytest.approx(ap, abs=1e-9)


def test_all_implementations_agree_on_a_larger_archive():
    rng = np.random.default_rng(13)
    n = 700
    labels = rng.integers(0, 7, n)
    x = (rng.normal(size=(n, 24)) + 0.8 * rng.normal(size=(7, 24))[labels]).astype(np.float32)
    ref = evaluate_retrieval(x, labels, metric="cosine", method="stable-sort", symmetric_cache_bytes=0, block=100)
    for kw in ({}, {"block": 33}, {"symmetric_cache_bytes": 0}, {"block": 1000}):
        s = evaluate_retrieval(x, labels, metric="cosine", **kw)
        np.testing.assert_allclose(s.ap, ref.ap, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.nmrr, ref.nmrr, rtol=0, atol=1e-12)
        for k in ref.precision_at:
            np.testing.assert_allclose(s.precision_at[k], ref.precision_at[k], rtol=0, atol=0)
        np.testing.assert_array_equal(s.confusion_counts, ref.confusion_counts)
    # and the explicit database form (the query's own row excluded by index) gives the same
    e = evaluate_retrieval(x, labels, x, labels, metric="cosine", exclude=np.arange(n))
    np.testing.assert_allclose(e.ap, ref.ap, rtol=0, atol=1e-12)


def test_classwise_map_and_confusion_matrix():
    labels = np.repeat(np.arange(4), 6)
    rng = np.random.default_rng(14)
    perfect = np.eye(4)[labels] + 1e-3 * rng.normal(size=(24, 4))
    s = evaluate_retrieval(perfect, labels, classes=["a", "b", "c", "d"], confusion_k=5)
    np.testing.assert_allclose(s.confusion_matrix(), np.eye(4))  # k=5 <= G=5
    assert s.classwise_map() == {c: pytest.approx(1.0) for c in "abcd"}

    x = rng.normal(size=(24, 3))
    s = evaluate_retrieval(x, labels, metric="euclidean", classes=["a", "b", "c", "d"], confusion_k=7)
    cm = s.confusion_matrix()
    np.testing.assert_allclose(cm.sum(1), np.ones(4))
    assert s.confusion_counts.sum() == 24 * 7
    cw = s.classwise_map()
    for c, name in enumerate("abcd"):
        assert cw[name] == pytest.approx(s.ap[labels == c].mean())
    # the confusion counts are the classes of each query's first 7 results
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(d, np.inf)
    expected = np.zeros((4, 4), int)
    for i in range(24):
        for j in np.argsort(d[i], kind="stable")[:7]:
            expected[labels[i], labels[j]] += 1
    np.testing.assert_array_equal(s.confusion_counts, expected)


def test_queries_without_relevant_items_are_left_out_and_counted():
    rng = np.random.default_rng(15)
    labels = np.array([0, 0, 0, 1, 1, 1, 2])  # class 2 has a single image: G = 0 for its query
    x = rng.normal(size=(7, 4))
    with pytest.warns(NoRelevantWarning, match="1 of 7 queries"):
        s = evaluate_retrieval(x, labels, classes=["a", "b", "lonely"], precision_at=(1, 3))
    assert s.n_skipped == 1 and s.n_scored == 6
    assert np.isnan(s.ap[6]) and np.isnan(s.nmrr[6]) and np.isnan(s.precision_at[1][6])
    assert s.map == pytest.approx(s.ap[:6].mean())
    assert s.anmrr == pytest.approx(s.nmrr[:6].mean())
    assert s.precision(3) == pytest.approx(s.precision_at[3][:6].mean())
    assert "lonely" not in s.classwise_map()
    assert s.confusion_counts[2].sum() == 0
    d = s.to_dict()
    assert d["queries"] == {"total": 7, "scored": 6, "skipped_no_relevant": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_retrieval(x, labels, warn=False)


def test_evaluate_ranking_on_truncated_lists():
    rng = np.random.default_rng(16)
    nq, n = 50, 40
    ql = rng.integers(0, 3, nq)
    ranked = rng.integers(0, 3, (nq, n))
    g = (ranked == ql[:, None]).sum(1)
    ap, nmrr, p = evaluate_ranking(ranked, ql, g, (1, 5))
    for i in range(nq):
        if g[i] == 0:
            assert np.isnan(ap[i])
            continue
        rel = ranked[i] == ql[i]
        ref_ap, ref_nmrr, _ = _reference(np.arange(n, dtype=float), rel.astype(int), 1)
        assert ap[i] == pytest.approx(ref_ap, abs=1e-12) and nmrr[i] == pytest.approx(ref_nmrr, abs=1e-12)
    # truncating to the first 10: relevant items past it add 0 to AP and count 1.25K in ANMRR
    ap10, nmrr10, _ = evaluate_ranking(ranked[:, :10], ql, g, (1,))
    for i in np.flatnonzero(g):
        rel = ranked[i, :10] == ql[i]
        hits = np.cumsum(rel)
        assert ap10[i] == pytest.approx((hits / np.arange(1, 11) * rel).sum() / g[i], abs=1e-12)
        k = 2 * g[i]
        ranks = np.flatnonzero(rel) + 1
        total = np.where(ranks <= k, ranks, 1.25 * k).sum() + (g[i] - rel.sum()) * 1.25 * k
        assert nmrr10[i] == pytest.approx((total / g[i] - 0.5 - g[i] / 2) / (1.25 * k - 0.5 - g[i] / 2), abs=1e-12)
    with pytest.raises(ValueError, match="more relevant"):
        evaluate_ranking(ranked, ql, np.zeros(nq, int), (1,))


def test_user_errors_are_one_clear_landlens_error():
    x = np.zeros((1, 3), np.float32)
    with pytest.raises(LandlensError, match="database is empty"):
        evaluate_retrieval(x, np.array([0]))
    with pytest.raises(LandlensError, match="no queries"):
        evaluate_retrieval(np.zeros((0, 3)), np.zeros(0, int), np.ones((2, 3)), np.zeros(2, int))
    bad = np.ones((4, 3), np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(LandlensError, match="1 query feature row"):
        evaluate_retrieval(bad, np.array([0, 0, 1, 1]))

    def explode(q, db):
        return torch.full((q.shape[0], db.shape[0]), float("inf"))

    for method in ("packed", "stable-sort"):
        with pytest.raises(LandlensError, match="non-finite"):
            evaluate_retrieval(np.ones((4, 2)), np.array([0, 0, 1, 1]), metric=explode, method=method)
