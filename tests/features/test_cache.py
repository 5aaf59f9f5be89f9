"""Feature cache: extract once, reuse, and keep different extractors apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.make_datasets import make_folder_dataset

from landlens.errors import LandlensError
from landlens.features import cache as cache_mod
from landlens.models.registry import create_backbone


@pytest.fixture
def checkpoint(tmp_path):
    import timm

    torch.manual_seed(3)
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    return path


def _bb(path, size=32):
    bb = create_backbone("resnet18", str(path))
    bb.preprocessing = bb.preprocessing.replace(input_size=size, resize_mode="squash")
    return bb


def test_extracts_once_then_reuses(tmp_path, checkpoint, monkeypatch):
    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=3, size=40)
    first = cache_mod.cached_features(data, backbone=_bb(checkpoint), cache_dir=tmp_path / "c", workers=0,
                                      progress=False)
    assert first.features.shape == (6, 512)

    def no_extraction(*a, **k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(cache_mod, "extract_features", no_extraction)
    again = cache_mod.cached_features(data, backbone=_bb(checkpoint), cache_dir=tmp_path / "c", workers=0,
                                      progress=False)
    np.testing.assert_array_equal(first.features, again.features)
    # another preprocessing is another cache entry (and would extract)
    with pytest.raises(AssertionError, match="from the cache"):
        cache_mod.cached_features(data, backbone=_bb(checkpoint, 48), cache_dir=tmp_path / "c", workers=0,
                                  progress=False)


def test_a_copy_of_the_folder_has_its_own_store(tmp_path, checkpoint):
    """The same file names under another folder are other images: a copy with one image changed
    gets that image's features, and its store records the copy's folder (an archive built from it
    names the copy's files)."""
    import shutil

    from PIL import Image

    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=3, size=40)
    copy = tmp_path / "copy" / data.name
    shutil.copytree(data, copy)
    changed = sorted((copy / "b").iterdir())[0]
    Image.open(changed).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed)
    first = cache_mod.cached_features(data, backbone=_bb(checkpoint), cache_dir=tmp_path / "c", workers=0,
                                      progress=False)
    second = cache_mod.cached_features(copy, backbone=_bb(checkpoint), cache_dir=tmp_path / "c", workers=0,
                                       progress=False)
    assert first.paths == second.paths
    row = second.paths.index(f"b/{changed.name}")
    assert not np.allclose(first.features[row], second.features[row])
    others = [i for i in range(len(first.paths)) if i != row]
    np.testing.assert_allclose(first.features[others], second.features[others], atol=1e-5)
    assert second.meta["dataset"]["root"] == str(copy.resolve())


def test_random_weights_are_not_cached(tmp_path):
    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=2, size=16)
    with pytest.raises(LandlensError, match="randomly initialised"):
        cache_mod.cached_features(data, backbone=create_backbone("resnet18", "none"), cache_dir=tmp_path / "c")
