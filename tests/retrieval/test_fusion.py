"""Feature fusion: concatenation of L2-normalised blocks, PCA/whitening, alignment, recipes."""

from __future__ import annotations

import numpy as np
import pytest

from landlens.errors import LandlensError
from landlens.features.store import FeatureSet
from landlens.retrieval.fusion import Fusion, align, fuse, parse_recipe


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
