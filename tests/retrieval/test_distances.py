"""Distances against straightforward numpy references, their properties and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landlens.errors import LandlensError
from landlens.retrieval import distances as D
from landlens.retrieval.distances import (
    ChiSquare,
    available_distances,
    get_distance,
    pairwise_distances,
    register_distance,
)


def _chi2_loop(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros((len(x), len(y)))
    for i in range(len(x)):
        for j in range(len(y)):
            s = 0.0
            for a, b in zip(x[i], y[j]):
                if a + b > 0:
                    s += (a - b) ** 2 / (a + b)
            out[i, j] = 0.5 * s
    return out


def _reference(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if name == "euclidean":
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    if name == "manhattan":
        return np.abs(x[:, None, :] - y[None, :, :]).sum(-1)
    if name == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        yn = y / np.linalg.norm(y, axis=1, keepdims=True)
        return 1 - xn @ yn.T
    return _chi2_loop(x, y)


@pytest.mark.parametrize("name", ["euclidean", "cosine", "manhattan", "chi2"])
def test_against_numpy_reference(name):
    rng = np.random.default_rng(1)
    x = rng.random((7, 5))
    y = rng.random((9, 5))
    if name == "chi2":
        x[0, :2] = 0.0
        y[3, :2] = 0.0  # 0/0 terms count 0
    got = get_distance(name)(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, _reference(name, x, y), rtol=1e-10, atol=1e-10)


def test_chi2_blocks_match_loop_for_any_tiling():
    rng = np.random.default_rng(2)
    x = rng.random((13, 6)) * (rng.random((13, 6)) > 0.3)  # sparse, with all-zero coordinates
    y = rng.random((11, 6)) * (rng.random((11, 6)) > 0.3)
    ref = _chi2_loop(x, y)
    for block in (1, 6, 7, 100, 10**6):
        got = ChiSquare(block_elements=block)(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_chi2_refuses_negative_features():
    x = torch.tensor([[0.5, -0.1], [0.2, 0.3]])
    with pytest.raises(LandlensError, match="negative"):
        get_distance("chi2")(x, x)
    with pytest.raises(LandlensError, match="feature set ucm/resnet18"):
        ChiSquare().check(x.numpy(), "feature set ucm/resnet18")


@pytest.mark.parametrize("name", ["euclidean", "cosine", "manhattan", "chi2"])
def test_symmetric_and_zero_on_identical(name):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((12, 8)).astype(np.float32) + 0.1)
    d = get_distance(name)(x, x)
    assert d.shape == (12, 12)
    torch.testing.assert_close(d, d.T, rtol=1e-5, atol=1e-5)
    # float32 matrix products leave a rounding residue on the diagonal
    assert float(d.diagonal().abs().max()) < (5e-3 if name == "euclidean" else 1e-5)
    off = d + torch.eye(12) * 1e9
    assert float(off.min()) > 1e-3  # distinct vectors are apart
    assert float(d.min()) >= -1e-6


def test_cosine_ignores_scale_and_euclidean_does_not():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(5, 6)))
    y = torch.from_numpy(rng.normal(size=(4, 6)))
    cos = get_distance("cosine")
    torch.testing.assert_close(cos(3.0 * x, 0.25 * y), cos(x, y))
    eu = get_distance("euclidean")
    assert not torch.allclose(eu(3.0 * x, y), eu(x, y))


def test_registry_names_aliases_and_errors():
    assert {"euclidean", "cosine", "manhattan", "chi2"} <= set(available_distances())
    assert get_distance("L1").name == "manhattan"
    assert get_distance("chi-square").name == "chi2"
    with pytest.raises(LandlensError, match="unknown distance 'hamming'.*cosine"):
        get_distance("hamming")
    with pytest.raises(ValueError, match="already registered"):
        register_distance("cosine", D.Cosine)


def test_register_a_learned_distance_factory():
    calls = {}

    class Scaled(D.BaseDistance):
        name = "scaled-l1"

        def __init__(self, scale: float = 1.0) -> None:
            calls["scale"] = scale
            self.scale = scale

        def compute(self, q, db, out=None):
            value = self.scale * torch.cdist(q, db, p=1)
            return value if out is None else out.copy_(value)

    register_distance("scaled-l1", Scaled)
    try:
        d = get_distance("scaled-l1", scale=2.0)
        assert calls["scale"] == 2.0
        x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        torch.testing.assert_close(d(x, x), 2.0 * torch.cdist(x, x, p=1))
    finally:
        D._REGISTRY.pop("scaled-l1", None)


def test_plain_function_and_pairwise_distances():
    def neg_dot(q, db):
        return -(q @ db.T)

    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    d = get_distance(neg_dot)
    assert d.name == "neg_dot"
    torch.testing.assert_close(d(x, x), -(x @ x.T))
    torch.testing.assert_close(pairwise_distances(x, x, "euclidean"), torch.cdist(x, x), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="dimensions differ"):
        get_distance("cosine")(x, torch.ones(2, 3))


def test_out_buffer_is_filled_in_place():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.random((6, 4)).astype(np.float32))
    for name in ("euclidean", "cosine", "manhattan", "chi2"):
        dist = get_distance(name)
        buf = torch.full((6, 10), -7.0)
        view = buf[:, 2:8]  # a strided view, as the archive evaluation uses
        dist(x, x, out=view)
        torch.testing.assert_close(buf[:, 2:8], dist(x, x))
        assert float(buf[:, :2].max()) == -7.0 and float(buf[:, 8:].max()) == -7.0
