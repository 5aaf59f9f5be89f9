"""The trained-classifier files: model.safetensors + model.json, round trip and refusals."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from landlens.errors import CheckpointError
from landlens.models import classifier as clf
from landlens.models.classifier import (
    MODEL_FORMAT_VERSION,
    HeadConfig,
    build_classifier,
    load_classifier,
    read_model_meta,
    save_classifier,
)
from landlens.models.preprocessing import Preprocessing

CLASSES = ["beach", "forest", "harbor"]


def _model(name: str = "tv_squeezenet1_1", head: HeadConfig | None = None, classes=CLASSES, **kwargs):
    torch.manual_seed(0)
    return build_classifier(name, list(classes), head or HeadConfig(), weights="none", verify=False, **kwargs)


def _x(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(3, 3, 64, 64)


@pytest.mark.parametrize(
    ("name", "head"),
    [("tv_squeezenet1_1", HeadConfig("se", dropout=0.2, reduction=8)),
     ("tv_mobilenet_v2", HeadConfig("mlp", dropout=0.5, hidden=32))],
)
def test_round_trip_gives_identical_outputs(tmp_path, name, head):
    pre = Preprocessing(input_size=96, crop_pct=1.0, resize_mode="squash", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    model = _model(name, head, preprocessing=pre)
    # move BatchNorm running statistics away from their defaults, so buffers are checked too
    model.train()
    with torch.no_grad():
        model(_x(7))
        for p in model.head.parameters():
            p.add_(0.01)
    model.eval()
    with torch.no_grad():
        expected = model(_x())
    meta_path = save_classifier(model, tmp_path / "run", extra={"epochs": 3})
    assert meta_path == tmp_path / "run" / "model.json"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.json", "model.safetensors"]

    loaded = load_classifier(tmp_path / "run")
    assert not loaded.training
    assert loaded.classes == CLASSES
    assert loaded.head_config == head
    assert loaded.preprocessing == pre
    assert loaded.backbone.spec.name == name
    with torch.no_grad():
        got = loaded(_x())
    assert torch.equal(got, expected)
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys()
    assert all(torch.equal(own[k], back[k]) for k in own)
    # model.json itself can be given, and it records what it promises
    assert torch.equal(load_classifier(meta_path)(_x()), expected)
    meta = read_model_meta(tmp_path / "run")
    assert meta["format_version"] == MODEL_FORMAT_VERSION
    assert meta["backbone"] == name and meta["classes"] == CLASSES and meta["extra"] == {"epochs": 3}
    assert meta["initial_weights"]["source"] == "none"


@pytest.fixture
def saved(tmp_path) -> Path:
    d = tmp_path / "run"
    save_classifier(_model(), d)
    return d


def test_other_format_version_is_refused(saved):
    meta_path = saved / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = MODEL_FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_classifier(saved)
    msg = str(info.value)
    assert str(meta_path) in msg and f"format {MODEL_FORMAT_VERSION + 1}" in msg
    assert "\n" not in msg


def test_tensors_from_another_backbone_are_refused(saved, tmp_path):
    other = tmp_path / "other"
    save_classifier(_model("geoembed_v3"), other)
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_classifier(saved)
    msg = str(info.value)
    assert str(saved / "model.safetensors") in msg and "tv_squeezenet1_1" in msg


def test_tensors_with_another_class_count_are_refused(saved, tmp_path):
    other = tmp_path / "four"
    save_classifier(_model(classes=[*CLASSES, "river"]), other)
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_classifier(saved)
    msg = str(info.value)
    assert str(saved / "model.safetensors") in msg and "3 classes" in msg and "head.fc" in msg
    # the other way round: a model.json that names four classes for three-class tensors
    meta_path = other / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["classes"] = CLASSES + ["river", "desert"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="5 classes"):
        load_classifier(other)


def test_tensors_for_another_head_are_refused(saved, tmp_path):
    other = tmp_path / "se"
    save_classifier(_model(head=HeadConfig("se")), other)
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_classifier(saved)


def test_missing_files_are_refused_with_their_path(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        load_classifier(saved)
    assert str(saved / "model.safetensors") in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_classifier(empty)
    assert str(empty) in str(info.value) and "model.json" in str(info.value)

    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        load_classifier(tmp_path / "nowhere")


def test_corrupt_files_are_refused_with_their_path(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError) as info:
        load_classifier(saved)
    assert str(saved / "model.safetensors") in str(info.value)

    (saved / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_classifier(saved)
    assert str(saved / "model.json") in str(info.value)

    (saved / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a landlens classifier"):
        load_classifier(saved)


def test_unknown_backbone_in_model_json_is_a_checkpoint_error(saved):
    meta_path = saved / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["backbone"] = "no_such_net_xyz"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no_such_net_xyz"):
        load_classifier(saved)


def test_loading_never_unpickles(saved, monkeypatch):
    # the tensors file is safetensors: an 8-byte little-endian header length, then a JSON header
    raw = (saved / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert "head.fc.weight" in header and header["head.fc.weight"]["shape"] == [3, 512]
    assert not raw.startswith(b"PK") and raw[:1] != b"\x80"  # not a torch zip, not a pickle stream

    def forbidden(*args, **kwargs):
        raise AssertionError("load_classifier must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    model = load_classifier(saved)
    assert model.classes == CLASSES
    assert clf.MODEL_WEIGHTS == "model.safetensors"
