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
