"""Trained run directories as backbones (``create_backbone('run:PATH')``): features, identity, errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from fixtures.make_datasets import make_folder_dataset
from landlens.errors import BackboneError, CheckpointError, WeightsError
from landlens.features.cache import cached_features, store_path
from landlens.models.classifier import (
    Classifier,
    Embedder,
    EmbeddingConfig,
    HeadConfig,
    load_classifier,
    load_embedder,
    run_weights_argument,
    save_classifier,
)
from landlens.models.preprocessing import Preprocessing
from landlens.models.registry import create_backbone, get_spec

CLASSES = ["beach", "forest", "harbor"]
PRE = Preprocessing(input_size=48, crop_pct=1.0, resize_mode="squash", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone("test_resnet", "none", preprocessing=PRE)


def _stir(model: torch.nn.Module) -> None:
    """Move weights and BatchNorm statistics away from their initial values (as training would)."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(3)))
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.eval()


def _x() -> torch.Tensor:
    return torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(11))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def classifier_run(tmp_path):
    model = Classifier(_backbone(), CLASSES, HeadConfig("mlp", hidden=16))
    _stir(model)
    d = tmp_path / "runs" / "ucm-cls"
    save_classifier(model, d)
    return d, model


@pytest.fixture
def embedder_run(tmp_path):
    model = Embedder(_backbone(1), CLASSES, EmbeddingConfig(dim=8, bn=True))
    _stir(model)
    d = tmp_path / "runs" / "ucm-metric"
    save_classifier(model, d)
    return d, model


def test_classification_run_gives_the_fine_tuned_backbone_features(classifier_run):
    d, model = classifier_run
    bb = create_backbone(f"run:{d}")
    x = _x()
    with torch.inference_mode():
        expected = model.backbone(x)
        got = bb(x)
    assert torch.equal(got, expected)  # the head is dropped, the backbone is bit-identical
    assert got.shape == (5, model.backbone.num_features) and bb.num_features == model.backbone.num_features
    assert bb.name == "run:ucm-cls" and bb.spec.family == "run" and bb.spec.arch == "test_resnet"
    assert bb.preprocessing == PRE  # the run's recorded preprocessing
    assert bb.weights.source == "run" and bb.weights.ref == str(d.resolve())
    assert bb.weights.digest == _sha256(d / "model.safetensors")
    assert not bb.training
    # the model.json itself and "weights=run" name the same thing
    assert create_backbone(f"run:{d / 'model.json'}", "run").weights.digest == bb.weights.digest


def test_metric_run_gives_the_normalised_embedding(embedder_run):
    d, model = embedder_run
    bb = create_backbone(f"run:{d}", "auto")
    x = _x()
    with torch.inference_mode():
        expected = model(x)
        got = bb(x)
    assert got.shape == (5, 8) and bb.num_features == 8
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    np.testing.assert_allclose(got.norm(dim=1).numpy(), np.ones(5), atol=1e-6)
    # the head's BatchNorm is in eval mode: the embedding of one image does not depend on its batch
    with torch.inference_mode():
        torch.testing.assert_close(bb(x[:1]), got[:1], rtol=1e-5, atol=1e-6)
    assert bb.weights.digest == _sha256(d / "model.safetensors")


def test_digest_follows_the_weights(classifier_run, tmp_path):
    d, model = classifier_run
    before = create_backbone(f"run:{d}")
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1e-3)
    save_classifier(model, d)  # "retrained": new tensors, new digest
    after = create_backbone(f"run:{d}")
    assert after.weights.digest != before.weights.digest
    assert after.weights.digest == _sha256(d / "model.safetensors")
    # caches key on the digest: the old features are not reused
    paths, labels = ["a/1.jpg", "b/2.jpg"], [0, 1]
    assert (store_path(tmp_path, "x", paths, labels, before, tmp_path)
            != store_path(tmp_path, "x", paths, labels, after, tmp_path))
    # an index that recorded the old run refuses the retrained one with one line naming both digests
    arg = run_weights_argument(before.weights.ref, before.weights.digest)
    with pytest.raises(WeightsError) as info:
        create_backbone(before.name, arg)
    msg = str(info.value)
    assert before.weights.digest[:12] in msg and after.weights.digest[:12] in msg and "\n" not in msg


def test_recorded_weights_argument_rebuilds_the_backbone(classifier_run, tmp_path, monkeypatch):
    d, _ = classifier_run
    bb = create_backbone(f"run:{d}")
    arg = run_weights_argument(bb.weights.ref, bb.weights.digest)
    assert arg == f"run:{d.resolve()}@{bb.weights.digest}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded name alone ('run:ucm-cls') would not resolve from here
    again = create_backbone(bb.name, arg, preprocessing=bb.preprocessing)
    assert (again.name, again.weights, again.preprocessing) == (bb.name, bb.weights, bb.preprocessing)
    x = _x()
    with torch.inference_mode():
        assert torch.equal(again(x), bb(x))
    with pytest.raises(BackboneError, match="different runs"):
        create_backbone("run:another-run", arg)


def test_features_of_a_run_go_through_the_cache(embedder_run, tmp_path):
    d, model = embedder_run
    folder = make_folder_dataset(tmp_path / "scenes", CLASSES, per_class=2, size=40)
    bb = create_backbone(f"run:{d}")
    fs = cached_features(folder, None, bb, cache_dir=tmp_path / "cache", progress=False, workers=1)
    assert fs.features.shape == (6, 8)
    from landlens.data.io import load_rgb
    from landlens.models.preprocessing import preprocess_images

    with torch.inference_mode():
        direct = model(preprocess_images([load_rgb(folder / p) for p in fs.paths], PRE)).numpy()
    np.testing.assert_allclose(fs.features, direct, rtol=1e-4, atol=1e-5)
    meta = json.loads((store_path(tmp_path / "cache", fs.meta["dataset"]["name"], fs.paths, fs.labels, bb, folder)
                       / "meta.json").read_text())
    assert meta["backbone"]["weights"]["source"] == "run"
    assert meta["backbone"]["weights"]["digest"] == _sha256(d / "model.safetensors")


def test_errors_are_one_line_and_name_the_thing(classifier_run, embedder_run, tmp_path):
    d, _ = classifier_run
    with pytest.raises(BackboneError, match="run directory not found") as info:
        create_backbone(f"run:{tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in str(info.value)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(BackboneError, match="model.json not found") as info:
        create_backbone(f"run:{empty}")
    assert str(empty) in str(info.value)
    with pytest.raises(WeightsError, match="does not apply"):
        create_backbone(f"run:{d}", "hub")
    with pytest.raises(WeightsError, match="expected 0123456789ab"):
        create_backbone(f"run:{d}@0123456789abcdef")
    with pytest.raises(BackboneError, match="trained run"):
        get_spec(f"run:{d}")
    # a tensors file copied in from another run no longer matches what model.json recorded
    other, _ = embedder_run
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    shutil.copy(other / "model.safetensors", copy / "model.safetensors")
    with pytest.raises(WeightsError, match="replaced after training") as info:
        create_backbone(f"run:{copy}")
    assert "\n" not in str(info.value)
    # an embedder is no classifier, and says how to use it
    with pytest.raises(CheckpointError, match="--backbone run:"):
        load_classifier(other)
    with pytest.raises(CheckpointError, match="holds a classifier, not a metric-learning embedder"):
        load_embedder(d)


def test_a_run_backbone_serves_an_archive(embedder_run, tmp_path):
    """index build / search by image with a metric-learning run as the backbone: the archive
    rebuilds the run's embedder from the recorded run (pinned to its digest), and an archive
    image searched by its file comes back first with its stored vector."""
    from landlens.data.io import load_rgb
    from landlens.models.preprocessing import preprocess_images
    from landlens.retrieval.archive import Archive

    d, model = embedder_run
    folder = make_folder_dataset(tmp_path / "scenes", CLASSES, per_class=2, size=40)
    arch = Archive.build(folder, tmp_path / "arch", backbone=f"run:{d}", rerank=None, cache_dir=tmp_path / "cache",
                         progress=False, workers=1)
    again = Archive.open(tmp_path / "arch")
    rec = again.records()[3]
    image = again.load_query(rec.path)
    vec = again.embed([image])
    with torch.inference_mode():
        direct = model(preprocess_images([load_rgb(rec.path)], PRE)).numpy()
    np.testing.assert_allclose(vec, direct, rtol=1e-4, atol=1e-5)
    hits = again.search_vectors(vec, 2)[0]
    assert hits[0].record.id == rec.id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert again.info()["backbone"] == arch.info()["backbone"]
