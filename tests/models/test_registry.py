"""Backbone registry and weight sources (file, hub wrapper, verification)."""

from __future__ import annotations

import pytest
import torch

from landlens.errors import BackboneError, WeightsError
from landlens.models import registry
from landlens.models.registry import create_backbone, get_spec, list_backbones
from landlens.models.weights import load_strict, state_dict_digest

# every named backbone except the very large NASNet-A, at the smallest input it accepts
SMALL = [s.name for s in list_backbones() if s.name not in ("nasnetalarge",) and s.family != "handcrafted"]


@pytest.mark.parametrize("name", SMALL)
def test_every_named_backbone_builds_and_pools(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    body, dim = registry.build_body(spec)
    size = 80 if spec.arch == "inception_v3" else 64
    if spec.arch in ("alexnet",):
        size = 96
    body.eval()
    with torch.inference_mode():
        out = body(torch.randn(2, 3, size, size))
    assert out.flatten(1).shape == (2, dim), (name, out.shape, dim)


def test_names_resolve():
    assert get_spec("ResNet50-D").arch == "resnet50d"
    assert get_spec("resnet50b").arch == "resnet50"
    assert get_spec("googlenet").family == "torchvision"
    assert get_spec("efficientnet-lite0").arch == "tf_efficientnet_lite0"
    any_timm = get_spec("regnety_002")
    assert any_timm.family == "timm" and any_timm.arch == "regnety_002"
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        get_spec("no_such_net")
    with pytest.raises(BackboneError, match="NASNet-Mobile"):
        get_spec("nasnet_mobile")


def test_preprocessing_follows_hub_tag():
    r50 = get_spec("resnet50")
    tv = registry.default_preprocessing(r50)  # resnet50.tv_in1k: torchvision's evaluation recipe
    assert (tv.input_size, tv.crop_pct, tv.interpolation) == (224, 0.875, "bilinear")
    a1 = registry.default_preprocessing(r50, "resnet50.a1_in1k")  # timm's A1 recipe evaluates differently
    assert (a1.crop_pct, a1.interpolation) == (0.95, "bicubic")
    inc = registry.default_preprocessing(get_spec("inception_v3"))
    assert inc.input_size == 299 and inc.mean == pytest.approx((0.5, 0.5, 0.5))


def _trained_resnet18_state(seed: int = 7) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    net = timm.create_model("resnet18", num_classes=10)
    return net.state_dict()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_file_weights_load_strictly(tmp_path, fmt):
    sd = _trained_resnet18_state()
    path = tmp_path / f"w.{ 'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "wrapped":  # a training checkpoint: {'state_dict': {'module.<key>': ...}, 'epoch': 3}
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        torch.save(sd, path)
    bb = create_backbone("resnet18", str(path))
    assert bb.weights.source == "file" and bb.num_features == 512
    body_sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert bb.weights.digest == state_dict_digest(body_sd)
    for k, v in body_sd.items():
        assert torch.equal(bb.body.state_dict()[k], v), k


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_trained_resnet18_state(), path)
    with pytest.raises(WeightsError, match=r"does not fit backbone 'resnet50'.*missing"):
        create_backbone("resnet50", str(path))


def test_weights_equal_to_random_init_are_refused(tmp_path):
    # the verification builds a fresh network with seed 0: a checkpoint of exactly that is a no-op load
    torch.manual_seed(0)
    body, _ = registry.build_body(get_spec("resnet18"))
    path = tmp_path / "random.pth"
    torch.save(body.state_dict(), path)
    with pytest.raises(WeightsError, match="random initialisation"):
        create_backbone("resnet18", str(path))
    assert create_backbone("resnet18", str(path), verify=False).weights.source == "file"


def test_unsafe_or_missing_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("resnet18", str(tmp_path / "nope.pth"))
    evil = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, evil)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_backbone("resnet18", str(evil))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=str(junk.name)):
        create_backbone("resnet18", str(junk))


def test_hub_failure_is_one_clear_line(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError) as e:
        create_backbone("resnet50", "hub")
    msg = str(e.value)
    assert "\n" not in msg and "resnet50.tv_in1k" in msg and "--weights PATH" in msg


def test_random_weights_are_explicit():
    bb = create_backbone("resnet18", "none")
    assert bb.weights.source == "none" and bb.weights.digest is None


def test_load_strict_reports_shape_mismatch():
    torch.manual_seed(0)
    body, _ = registry.build_body(get_spec("resnet18"))
    sd = dict(body.state_dict())
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(WeightsError, match=r"wrong shape \(e.g. conv1.weight"):
        load_strict(body, sd, "test weights", "resnet18")
