"""Feature extraction and the feature store: exactness, resume, refusal, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from landlens.errors import FeatureStoreError, ImageReadError
from landlens.features import extract as extract_mod
from landlens.features.extract import extract_features
from landlens.features.store import FeatureStore
from landlens.models.preprocessing import preprocess_images
from landlens.models.registry import create_backbone


def _folder(root, classes=("a", "b", "c"), per_class=6, size=40):
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.uint8)
            base[..., ci % 3] = 160
            img = np.clip(base + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{c}_{i}.png")
    return root


def _dataset(root):
    from landlens.data.folder import scan_folder

    return scan_folder(root)


@pytest.fixture(scope="module")
def backbone():
    bb = create_backbone("resnet18", "none")
    bb.preprocessing = bb.preprocessing.replace(input_size=32, resize_mode="squash")
    return bb


def _run(ds, bb, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, out, **kw)


@pytest.mark.parametrize("optimize", ["none", "auto"])
def test_features_equal_a_direct_forward(tmp_path, backbone, optimize):
    ds = _dataset(_folder(tmp_path / "data"))
    res = _run(ds, backbone, tmp_path / "store", batch_size=5, chunk_size=7, optimize=optimize)
    fs = FeatureStore(res.store).load()
    assert fs.features.shape == (18, 512) and fs.valid.all()
    assert fs.paths == ds.paths and (fs.labels == ds.labels).all()
    imgs = [Image.open(ds.absolute_path(i)) for i in range(len(ds))]
    with torch.inference_mode():
        ref = backbone(preprocess_images(imgs, backbone.preprocessing)).numpy()
    np.testing.assert_allclose(fs.features, ref, rtol=1e-4, atol=1e-4)
    meta = fs.meta
    assert meta["identity"]["backbone"] == "resnet18" and meta["status"] == "complete"
    assert not (res.store / "chunks").exists()


def test_interrupted_run_resumes_and_matches(tmp_path, backbone, monkeypatch):
    ds = _dataset(_folder(tmp_path / "data"))
    full = FeatureStore(_run(ds, backbone, tmp_path / "full", batch_size=4, chunk_size=4).store).load()

    calls = {"n": 0}
    real = FeatureStore.write_chunk

    def dying(self, *a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(FeatureStore, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(ds, backbone, tmp_path / "resumed", batch_size=4, chunk_size=4)
    monkeypatch.setattr(FeatureStore, "write_chunk", real)
    store = FeatureStore(tmp_path / "resumed")
    assert store.completed_chunks() == {0, 1}
    with pytest.raises(FeatureStoreError, match="incomplete"):
        store.load()
    res = _run(ds, backbone, tmp_path / "resumed", batch_size=4, chunk_size=4)
    assert res.n_extracted == 18 - 8  # only the unfinished chunks ran
    np.testing.assert_allclose(store.load().features, full.features, rtol=1e-5, atol=1e-6)
    again = _run(ds, backbone, tmp_path / "resumed", batch_size=4, chunk_size=4)
    assert again.n_extracted == 0


def test_mismatched_reuse_is_refused(tmp_path, backbone):
    ds = _dataset(_folder(tmp_path / "data"))
    _run(ds, backbone, tmp_path / "s", chunk_size=4)
    other = create_backbone("resnet18", "none")
    other.preprocessing = backbone.preprocessing.replace(input_size=48)
    with pytest.raises(FeatureStoreError, match="different preprocessing"):
        _run(ds, other, tmp_path / "s", chunk_size=4)
    sub = ds.subset(range(10))
    with pytest.raises(FeatureStoreError, match="different list of images"):
        _run(sub, backbone, tmp_path / "s", chunk_size=4)
    with pytest.raises(FeatureStoreError, match="chunk"):
        _run(ds, backbone, tmp_path / "s", chunk_size=8)
    assert _run(sub, backbone, tmp_path / "s", chunk_size=4, overwrite=True).n_extracted == 10


def test_bad_images_are_skipped_and_reported(tmp_path, backbone):
    root = _folder(tmp_path / "data")
    (root / "a" / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "b" / "b_empty.jpg").write_bytes(b"")
    ds = _dataset(root)
    res = _run(ds, backbone, tmp_path / "s", chunk_size=4, batch_size=3)
    fs = FeatureStore(res.store).load()
    bad = {f["path"] for f in fs.meta["failures"]}
    assert bad == {"a/a_broken.png", "b/b_empty.jpg"}
    assert (~fs.valid).sum() == 2 and np.isnan(fs.features[~fs.valid]).all()
    assert len(fs.only_valid()) == 18


def test_strict_stops_but_keeps_finished_chunks(tmp_path, backbone):
    root = _folder(tmp_path / "data")
    (root / "c" / "c_zz_bad.jpg").write_bytes(b"GIF89a garbage")
    ds = _dataset(root)
    with pytest.raises(ImageReadError, match="c_zz_bad.jpg"):
        _run(ds, backbone, tmp_path / "s", chunk_size=4, batch_size=2, strict=True)
    store = FeatureStore(tmp_path / "s")
    assert len(store.completed_chunks()) >= 3  # everything before class c's last image was kept
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["status"] == "partial"


def test_worker_processes_give_same_features(tmp_path, backbone):
    ds = _dataset(_folder(tmp_path / "data"))
    a = FeatureStore(_run(ds, backbone, tmp_path / "a", workers=0).store).load().features
    b = FeatureStore(_run(ds, backbone, tmp_path / "b", workers=2, batch_size=4).store).load().features
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_optimized_graph_equals_eager(backbone):
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fast = extract_mod.optimize_for_inference(backbone, x, "auto")
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), backbone(x), rtol=1e-4, atol=1e-4)


def test_auto_falls_back_when_compilation_fails(backbone, monkeypatch):
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def broken(*a, **k):
        raise RuntimeError("no compiler")

    from landlens.features import inference

    monkeypatch.setattr(inference, "_onnx", broken)  # auto tries ONNX Runtime first: it fails too
    monkeypatch.setattr(inference, "_compile", broken)
    fast = inference.optimize_for_inference(backbone, x, "auto", n_images=10**6)
    assert isinstance(fast, torch.jit.ScriptModule)
    with pytest.raises(Exception, match="--optimize compile: no compiler"):
        inference.optimize_for_inference(backbone, x, "compile")
