"""Feature fusion: concatenation of L2-normalised blocks, PCA/whitening, alignment, recipes."""

from __future__ import annotations

import numpy as np
import pytest

from landlens.errors import LandlensError
from landlens.features.store import FeatureSet
from landlens.features.fusion import Fusion, align, fuse, parse_recipe


def _set(x, paths, labels, name):
    return FeatureSet(np.asarray(x, np.float32), list(paths), np.asarray(labels), ["a", "b"],
                      {"identity": {"backbone": name, "weights_digest": name * 2}}, np.ones(len(paths), bool))


def test_concat_weighs_every_backbone_equally():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 4)), rng.normal(size=(10, 7))
    f1 = Fusion().fit_transform([a, b])
    f2 = Fusion().fit_transform([a * 1000.0, b * 0.001])  # scale of one backbone does not matter
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(f1[:, :4], axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f1, axis=1), np.sqrt(2), rtol=1e-5)


def test_pca_matches_sklearn_and_whitening_decorrelates():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    fz = Fusion(pca_dim=5, normalize_blocks=False).fit([x])
    ref = PCA(n_components=5).fit(x)
    np.testing.assert_allclose(fz.explained_variance_, ref.explained_variance_, rtol=1e-6)
    # same subspace and same directions up to sign
    np.testing.assert_allclose(np.abs(fz.components_ @ ref.components_.T), np.eye(5), atol=1e-6)
    w = Fusion(pca_dim=5, whiten=True, normalize_blocks=False).fit([x])
    y = (x - w.mean_) @ w.components_.T / np.sqrt(w.explained_variance_ + w.eps)
    np.testing.assert_allclose(np.cov(y.T), np.eye(5), atol=1e-4)
    out = w.transform([x])
    assert out.shape == (300, 5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)


def test_pca_dimension_is_checked():
    with pytest.raises(LandlensError, match="PCA dimension 50"):
        Fusion(pca_dim=50).fit([np.ones((10, 8))])
    with pytest.raises(LandlensError, match="before fit"):
        Fusion().transform([np.ones((2, 2))])


def test_align_and_fuse_by_path():
    a = _set([[1, 0], [0, 1], [1, 1]], ["x", "y", "z"], [0, 1, 1], "A")
    b = _set([[5, 5, 5], [1, 2, 3]], ["z", "x"], [1, 0], "B")  # other order, 'y' missing
    aa, bb = align([a, b])
    assert aa.paths == bb.paths == ["x", "z"]
    np.testing.assert_array_equal(bb.features, [[1, 2, 3], [5, 5, 5]])
    f = fuse([a, b])
    assert f.features.shape == (2, 5) and f.paths == ["x", "z"]
    assert [s["backbone"] for s in f.meta["fusion"]["sources"]] == ["A", "B"]
    c = _set([[1, 0]], ["x"], [1], "C")  # same image, another label
    with pytest.raises(LandlensError, match="label the same images differently"):
        align([a, c])
    with pytest.raises(LandlensError, match="share no image"):
        align([a, _set([[1, 1]], ["w"], [0], "D")])


def test_recipes():
    assert parse_recipe("resnet50+resnet101+resnet152") == (["resnet50", "resnet101", "resnet152"], None, False)
    assert parse_recipe("a+b,pcaw256") == (["a", "b"], 256, True)
    assert parse_recipe("a,pca64") == (["a"], 64, False)
    with pytest.raises(LandlensError, match="fusion recipe"):
        parse_recipe("a+b,zca9")


def _numpy_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference PCA by numpy's SVD of the centred data: mean, components (dim, D), variances.

    ``x`` is rounded to float32 first, as Fusion reads its blocks."""
    x = x.astype(np.float32).astype(np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:dim], s[:dim] ** 2 / (len(x) - 1)


@pytest.mark.parametrize("n, d, dim", [(300, 12, 5), (40, 90, 40), (40, 90, 10)])  # more images, fewer images
def test_projection_equals_a_numpy_svd_up_to_component_sign(n, d, dim):
    rng = np.random.default_rng(n + d)
    x = rng.gamma(1.0, 1.0, size=(n, d)) @ rng.normal(size=(d, d))
    mean, comps, var = _numpy_pca(x, dim)
    keep = var > 1e-9 * var[0]  # well-defined directions (not the null space of a short matrix)
    fz = Fusion(pca_dim=dim, normalize_blocks=False).fit([x])
    np.testing.assert_allclose(fz.explained_variance_[keep], var[keep], rtol=1e-8)
    signs = np.sign(np.sum(fz.components_ * comps, axis=1))
    np.testing.assert_allclose((fz.components_ * signs[:, None])[keep], comps[keep], atol=1e-8)
    # the largest loading of every component is positive (a deterministic sign)
    assert (fz.components_[np.arange(dim), np.abs(fz.components_).argmax(1)] > 0).all()
    y = (x.astype(np.float32) - mean) @ comps.T * signs
    ref = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(fz.transform([x]), ref, atol=1e-5)


def test_whitening_floors_the_variance_of_directions_the_database_does_not_span():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 50))  # 30 images in 50-d: the 30th component has variance ~0 (rounding)
    w = Fusion(whiten=True, normalize_blocks=False).fit([x])
    assert w.pca_dim == 30 and w.explained_variance_[-1] < 1e-20
    mean, comps, var = _numpy_pca(x, 30)
    signs = np.sign(np.sum(w.components_ * comps, axis=1))
    y = ((x.astype(np.float32) - mean) @ comps.T * signs) / np.sqrt(np.maximum(var, 0) + w.eps)
    out = w.transform([x])
    np.testing.assert_allclose(out[:, :29], (y / np.linalg.norm(y, axis=1, keepdims=True))[:, :29], atol=1e-5)
    assert np.abs(out[:, -1]).max() < 1e-6  # the noise direction is damped, not scaled up to unit variance
    with pytest.raises(LandlensError, match="at least 2 images"):
        Fusion(whiten=True).fit([np.ones((1, 4))])


def test_pca_refuses_nan_features_in_one_line():
    x = np.random.default_rng(0).normal(size=(10, 4))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(LandlensError, match="NaN/inf values"):
        Fusion(pca_dim=2).fit([bad])
    with pytest.raises(LandlensError, match="NaN/inf values"):
        Fusion(pca_dim=2).fit([x]).transform([bad])
