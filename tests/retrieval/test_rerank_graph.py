"""The re-rankers' database k-NN graph (FAISS) against a brute-force numpy reference.

The reference is a dense float64 ``x @ x.T`` with the diagonal masked and a stable
``argsort``: it shares nothing with the code under test (no FAISS, no torch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landlens.retrieval.rerank import Diffusion, KReciprocal, knn_graph, topk_rows


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other rows by dot product, dense float64, ties by row index."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


@pytest.mark.parametrize("n, dim, k", [(50, 8, 5), (300, 64, 20), (257, 3, 40)])
def test_knn_graph_equals_brute_force(n, dim, k):
    rng = np.random.default_rng(n)
    x = _unit_rows(rng.normal(size=(n, dim)))
    ref_s, ref_i = _brute_force(x, k)
    for given in (x, torch.from_numpy(x)):
        sims, idx = knn_graph(given, k)
        assert sims.dtype == torch.float32 and idx.dtype == torch.int64
        assert tuple(sims.shape) == tuple(idx.shape) == (n, k)
        np.testing.assert_allclose(sims.numpy(), ref_s, atol=1e-5)
        # identical lists where the reference has no near-tie at the boundary or inside the list
        gaps = np.diff(ref_s, axis=1)
        clear = (np.abs(gaps) > 1e-5).all(axis=1)
        s_full = x.astype(np.float64) @ x.astype(np.float64).T
        np.fill_diagonal(s_full, -np.inf)
        nxt = -np.sort(-s_full, axis=1)[:, k]
        clear &= ref_s[:, -1] - nxt > 1e-5
        assert clear.mean() > 0.5  # the check below covers most rows
        np.testing.assert_array_equal(idx.numpy()[clear], ref_i[clear])
        # every row: the same neighbour set up to rows tied (within rounding) with the k-th
        for r in np.flatnonzero(~clear):
            got = set(idx.numpy()[r].tolist())
            sure = set(ref_i[r][ref_s[r] > ref_s[r, -1] + 1e-5].tolist())
            assert sure <= got
            assert (s_full[r, list(got)] >= ref_s[r, -1] - 1e-5).all()
        assert not (idx.numpy() == np.arange(n)[:, None]).any()  # never its own neighbour


def test_knn_graph_with_duplicate_and_zero_rows_and_caps():
    x = _unit_rows(np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0.8, 0.6, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float64))
    sims, idx = knn_graph(x, 2)
    for r in range(3):  # three identical rows: each one's two neighbours are the two others, similarity 1
        assert sorted(idx[r].tolist()) == sorted({0, 1, 2} - {r})
        np.testing.assert_allclose(sims[r].numpy(), [1, 1], atol=1e-6)
    assert idx[3, 0].item() in (0, 1, 2) and sims[3, 0].item() == pytest.approx(0.8)
    z = np.zeros((4, 5), dtype=np.float32)  # all similarities 0: any other row, never itself
    sims, idx = knn_graph(z, 3)
    assert (sims.numpy() == 0).all()
    assert all(sorted(idx[r].tolist()) == sorted(set(range(4)) - {r}) for r in range(4))
    _, i3 = knn_graph(x, 100)  # k capped at n - 1
    assert tuple(i3.shape) == (6, 5)
    assert all(sorted(i3[r].tolist()) == sorted(set(range(6)) - {r}) for r in range(6))
    s0, i0 = knn_graph(x[:1], 5)  # one row: no neighbour
    assert tuple(s0.shape) == tuple(i0.shape) == (1, 0)


def test_rerankers_build_their_graph_from_the_brute_force_lists():
    rng = np.random.default_rng(7)
    x = _unit_rows(np.abs(rng.normal(size=(120, 16))))
    _, ref = _brute_force(x, 10)
    np.testing.assert_array_equal(Diffusion(k=10).fit(x).knn_indices_, ref)
    kr = KReciprocal(k1=10, k2=4).fit(x)
    np.testing.assert_array_equal(kr.ranks_[:, 0], np.arange(120))
    np.testing.assert_array_equal(kr.ranks_[:, 1:], ref)


def test_topk_rows_caps_k():
    s = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]])
    v, i = topk_rows(s, 2)
    assert i.tolist() == [[1, 2], [2, 0]]
    np.testing.assert_allclose(v.numpy(), [[0.9, 0.5], [0.7, 0.3]])
    assert tuple(topk_rows(s, 10)[1].shape) == (2, 3)
