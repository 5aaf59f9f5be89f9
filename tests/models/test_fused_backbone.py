"""A fusion as one backbone (:mod:`landlens.models.fusion`) against the study's recipe computed
from separately extracted members (:func:`landlens.fuse`), and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.make_datasets import make_dataset
from fixtures.weights import require

import landlens
from landlens.errors import BackboneError
from landlens.features.fusion import l2_normalize
from landlens.models.fusion import FUSION_PRESETS, fusion_members
from landlens.models.packaged import PACKAGED


def _need(*keys: str) -> None:
    require(*(PACKAGED[k].distribution for k in keys))


def test_member_names_presets_and_refusals():
    assert fusion_members("fusion") == FUSION_PRESETS["offline4"] == FUSION_PRESETS["imagenet3"] + ("geoembed_v3",)
    assert fusion_members("fusion:offline6") == FUSION_PRESETS["offline6"]
    assert fusion_members("fusion:a+b") == ("a", "b")
    for bad in ("fusion:only_one", "fusion:a+a", "fusion:a+", "fusion:a+fusion:b"):
        with pytest.raises(BackboneError, match="fusion"):
            fusion_members(bad)
    with pytest.raises(BackboneError, match="checkpoint file holds one backbone"):
        landlens.create_backbone("fusion", "weights.safetensors")


def test_fused_features_equal_the_studied_fusion_of_separate_extractions(tmp_path: Path):
    """Images already at the shared input size, squashed: each member sees exactly what its own
    extraction sees, so the fused vector must equal L2-normalise(concat(L2(member features)))."""
    _need("efficientnet-lite0", "deepsort-mobilenetv2")
    data = make_dataset(tmp_path / "d", "ucmerced", per_class=2, classes=3, size=224)
    pre = landlens.create_backbone("tv_mobilenet_v2", "package").preprocessing.replace(resize_mode="squash")
    members = []
    for name in ("tf_efficientnet_lite0", "tv_mobilenet_v2"):
        bb = landlens.create_backbone(name, "package")
        bb = landlens.create_backbone(name, "package", preprocessing=bb.preprocessing.replace(resize_mode="squash"))
        members.append(landlens.extract(data, bb, cache_dir=tmp_path / "cache", optimize="none"))
    reference = l2_normalize(landlens.fuse(members).features)

    fused_bb = landlens.create_backbone("fusion:tf_efficientnet_lite0+tv_mobilenet_v2", "package",
                                        preprocessing=pre.replace(mean=(0.0,) * 3, std=(1.0,) * 3, channel_order="RGB"))
    assert fused_bb.member_sizes == (224, 224) and fused_bb.num_features == 2560
    fused = landlens.extract(data, fused_bb, cache_dir=tmp_path / "cache", optimize="none")
    assert fused.paths == members[0].paths
    np.testing.assert_allclose(fused.features, reference, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(fused.features, axis=1), 1.0, atol=1e-5)


def test_bgr_member_view_and_resize():
    """SqueezeNet's converted weights want BGR in 0-255 minus the Caffe mean; a member of a
    different size is resized inside the fusion. Checked on the member's own forward."""
    _need("efficientnet-lite0", "ndf-squeezenet1_1")
    fused = landlens.create_backbone("fusion:tf_efficientnet_lite0+tv_squeezenet1_1", "package").eval()
    assert fused.preprocessing.input_size == 227 and fused.member_sizes == (224, 227)
    lite0, squeeze = fused.members
    x = torch.rand(2, 3, 227, 227)
    with torch.no_grad():
        got = fused(x)
        sq_pre = squeeze.preprocessing
        sq_in = (x.flip(1) - torch.tensor(sq_pre.mean).view(1, 3, 1, 1)) / torch.tensor(sq_pre.std).view(1, 3, 1, 1)
        want_sq = torch.nn.functional.normalize(squeeze(sq_in), dim=1) / np.sqrt(2)
        small = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        want_l0 = torch.nn.functional.normalize(lite0((small - 0.5) / 0.5), dim=1) / np.sqrt(2)
    np.testing.assert_allclose(got[:, :1280].numpy(), want_l0.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 1280:].numpy(), want_sq.numpy(), atol=1e-5)
    assert fused.weights.source == "fusion" and fused.weights.ref == "package" and len(fused.weights.digest) == 64
    assert [m["backbone"] for m in fused.describe()["members"]] == ["tf_efficientnet_lite0", "tv_squeezenet1_1"]


def test_a_classifier_on_a_fusion_saves_and_reloads_without_its_weights_packages(tmp_path: Path):
    """model.json records each member's architecture and view; the reloaded network computes the
    same log-probabilities (the loader builds random members, the tensors come from the file)."""
    _need("efficientnet-lite0", "ndf-squeezenet1_1")
    from landlens.models.classifier import Classifier, load_classifier, save_classifier

    fused = landlens.create_backbone("fusion:tf_efficientnet_lite0+tv_squeezenet1_1", "package")
    model = Classifier(fused, ["a", "b", "c"]).eval()
    save_classifier(model, tmp_path / "run")
    again = load_classifier(tmp_path / "run")
    assert again.backbone.name == fused.name and again.backbone.member_sizes == fused.member_sizes
    assert [m.preprocessing for m in again.backbone.members] == [m.preprocessing for m in fused.members]
    x = torch.rand(2, 3, 227, 227)
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), atol=1e-5)


def test_an_archive_of_a_fusion_embeds_queries_and_additions_as_it_indexed(tmp_path: Path):
    """Index, search by file (eager and traced), add: every vector is the fusion's extraction."""
    _need("efficientnet-lite0", "ndf-squeezenet1_1")
    from fixtures.make_datasets import make_folder_dataset

    data = make_folder_dataset(tmp_path / "d", ["beach", "forest"], per_class=3, size=80)
    name = "fusion:tf_efficientnet_lite0+tv_squeezenet1_1"
    arch = landlens.Archive.build(data, tmp_path / "a", backbone=name, weights="package", cache_dir=tmp_path / "c",
                                  progress=False)
    assert arch.backbone_name == name and arch.rerank is not None  # the archive default: re-ranked
    first = arch.records()[0]
    stored = arch.vector(first.id)
    for mode in ("none", "jit"):
        if mode == "jit":
            arch.optimize("jit")
        got = arch.embed([arch.load_query(first.path)])[0]
        np.testing.assert_allclose(got, stored, atol=1e-4)
    extra = make_folder_dataset(tmp_path / "e", ["lake"], per_class=1, size=72, seed=5)
    new_file = next(extra.rglob("*.jpg"))
    (rec,) = arch.add([new_file], ["lake"])
    want = landlens.extract([new_file], landlens.create_backbone(name, "package"), cache_dir=tmp_path / "c2")
    np.testing.assert_allclose(arch.vector(rec.id), want.features[0], atol=1e-4)
