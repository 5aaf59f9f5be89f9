"""CLIP-family checkpoints through open_clip: both towers give open_clip's own outputs, in every
published checkpoint layout, offline; wrong, unsafe or TorchScript files are one-line errors.

No published checkpoint is reachable here, so tiny randomly initialised open_clip models (a ViT
and a ModifiedResNet, registered as model configs) are saved in the layouts RemoteCLIP,
GeoRSCLIP, SkyCLIP and open_clip's hub files use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures.weights import require
from PIL import Image

from landlens.errors import BackboneError, WeightsError
from landlens.models.preprocessing import preprocess_images
from landlens.models.registry import create_backbone, get_spec
from landlens.models.text import create_text_tower

VIT = "landlens-test-ViT-tiny"
RN = "landlens-test-RN-tiny"
VIT_WIDE = "landlens-test-ViT-wide"
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
CONFIGS = {
    VIT: {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                          "patch_size": 8}, "text_cfg": TEXT},
    VIT_WIDE: {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "head_width": 32,
                                               "patch_size": 8}, "text_cfg": TEXT},
    RN: {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64,
                                         "patch_size": None}, "text_cfg": TEXT},
}
SENTENCES = ["a harbor with many boats docked in lines", "dense residential area", "an airplane at the airport", ""]
LAYOUTS = ("plain.pt", "training.pt", "model.safetensors", "open_clip_pytorch_model.bin")


def save_layout(state: dict[str, torch.Tensor], path: Path) -> Path:
    """``state`` written as the published checkpoints are (by the layout's file name)."""
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if path.name == "training.pt":  # open_clip's training script under DistributedDataParallel (SkyCLIP epoch_20.pt)
        torch.save({"epoch": 20, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5,
                                                                                             "betas": (0.9, 0.98)}]}},
                   path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:  # a plain state dict (RemoteCLIP, GeoRSCLIP, open_clip_pytorch_model.bin)
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def oc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require("open_clip_torch", why="open_clip (pip install 'landlens[clip]')")
    import open_clip

    folder = tmp_path_factory.mktemp("openclip_configs")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return open_clip


def make_model(oc: Any, arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return oc.create_model(arch, pretrained=None, pretrained_hf=False).eval()


@pytest.fixture(scope="module")
def vit(oc: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, Path]]:
    model = make_model(oc, VIT, seed=0)
    folder = tmp_path_factory.mktemp("vit")
    return model, {layout: save_layout(model.state_dict(), folder / layout) for layout in LAYOUTS}


def images(size: int) -> tuple[torch.Tensor, list[Image.Image]]:
    g = torch.Generator().manual_seed(7)
    batch = torch.randn(3, 3, size, size, generator=g)
    rng = np.random.default_rng(3)
    pil = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 40), (33, 90), (64, 64))]
    return batch, pil


@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_tower_is_encode_image_in_every_layout(oc: Any, vit: Any, layout: str) -> None:
    model, files = vit
    bb = create_backbone(f"openclip:{VIT}", weights=str(files[layout]))
    x, _ = images(32)
    with torch.inference_mode():
        got, want = bb(x), model.encode_image(x)
    assert got.shape == (3, 32) and bb.num_features == 32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got.norm(dim=1), torch.ones(3))  # not normalised: landlens normalises later
    assert bb.name == f"openclip:{VIT}" and bb.spec.family == "openclip"
    assert bb.weights.source == "file" and bb.weights.ref == str(files[layout].resolve())
    assert bb.weights.file_sha256 and len(bb.weights.digest or "") == 64


@pytest.mark.parametrize("layout", ["plain.pt", "training.pt", "model.safetensors"])
def test_text_tower_is_normalised_encode_text(oc: Any, vit: Any, layout: str) -> None:
    model, files = vit
    tower = create_text_tower(f"openclip:{VIT}", weights=str(files[layout]))
    with torch.inference_mode():
        want = model.encode_text(oc.get_tokenizer(VIT)(SENTENCES), normalize=True).numpy()
    got = tower.encode(SENTENCES)
    assert got.shape == (4, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tower.encode(SENTENCES[1:2], batch_size=1)[0], got[1], atol=1e-6)
    assert tower.encode([]).shape == (0, 32)
    info = tower.info
    assert (info.name, info.source, info.dim, info.max_length, info.pooling) == (
        f"openclip:{VIT}", "file", 32, 77, "clip-eot")
    assert info.ref == str(files[layout].resolve()) and info.extra["arch"] == VIT
    with pytest.raises(TypeError):
        tower.encode("one string")


def test_resnet_layout_with_batchnorm(oc: Any, tmp_path: Path) -> None:
    model = make_model(oc, RN, seed=1)
    path = save_layout(model.state_dict(), tmp_path / "RemoteCLIP-RN-tiny.pt")
    bb = create_backbone(f"openclip:{RN}", weights=str(path))
    x, _ = images(64)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), model.encode_image(x), atol=1e-5, rtol=0)
    assert bb.preprocessing.input_size == 64
    # older files without the BatchNorm counters load too (they do not change outputs)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    again = create_backbone(f"openclip:{RN}", weights=str(save_layout(sd, tmp_path / "no_counters.pt")))
    assert again.weights.digest == bb.weights.digest


def test_preprocessing_follows_open_clip(oc: Any, vit: Any) -> None:
    model, files = vit
    bb = create_backbone(f"openclip:{VIT}", weights=str(files["plain.pt"]))
    pre = bb.preprocessing
    assert pre.input_size == CONFIGS[VIT]["vision_cfg"]["image_size"]
    assert pre.mean == pytest.approx(oc.OPENAI_DATASET_MEAN) and pre.std == pytest.approx(oc.OPENAI_DATASET_STD)
    assert (pre.interpolation, pre.resize_mode, pre.crop_pct) == ("bicubic", "crop", 1.0)
    # pixel for pixel what open_clip's own evaluation transform gives, on images of other shapes
    _, pil = images(32)
    transform = oc.image_transform(32, is_train=False, mean=oc.OPENAI_DATASET_MEAN, std=oc.OPENAI_DATASET_STD,
                                   resize_mode="shortest", interpolation="bicubic")
    want = torch.stack([transform(im) for im in pil])
    got = preprocess_images(pil, pre)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(bb(got), model.encode_image(want), atol=1e-5, rtol=0)
    # a caller's preprocessing wins
    other = pre.replace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")
    assert create_backbone(f"openclip:{VIT}", str(files["plain.pt"]), preprocessing=other).preprocessing == other
    with pytest.raises(WeightsError, match="cannot run on 48x48 inputs"):  # a ViT's position embedding is fixed
        create_backbone(f"openclip:{VIT}", str(files["plain.pt"]), preprocessing=pre.replace(input_size=48))


def test_preprocessing_of_tag_configs() -> None:
    from landlens.models.openclip import openclip_preprocessing

    siglip = {"size": 256, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
              "resize_mode": "squash"}
    pre = openclip_preprocessing(siglip)
    assert (pre.input_size, pre.resize_mode, pre.mean) == (256, "squash", (0.5, 0.5, 0.5))
    assert openclip_preprocessing({"size": (224, 224), "mean": (0, 0, 0), "std": (1, 1, 1)}).input_size == 224
    with pytest.raises(WeightsError, match="resize_mode 'longest'"):
        openclip_preprocessing({**siglip, "resize_mode": "longest"})
    with pytest.raises(WeightsError, match="non-square"):
        openclip_preprocessing({**siglip, "size": (224, 256)})


def test_digest_is_the_weights(oc: Any, vit: Any, tmp_path: Path) -> None:
    _, files = vit
    a = create_backbone(f"openclip:{VIT}", weights=str(files["plain.pt"]))
    same = create_backbone(f"openclip:{VIT}", weights=str(files["training.pt"]))
    assert same.weights.digest == a.weights.digest  # one set of weights, whatever the layout
    assert same.weights.file_sha256 != a.weights.file_sha256
    other = save_layout(make_model(oc, VIT, seed=5).state_dict(), tmp_path / "other.pt")
    b = create_backbone(f"openclip:{VIT}", weights=str(other))
    assert b.weights.digest != a.weights.digest
    ta = create_text_tower(f"openclip:{VIT}", str(files["plain.pt"]))
    tb = create_text_tower(f"openclip:{VIT}", str(other))
    assert ta.info.digest != tb.info.digest and ta.info.digest != a.weights.digest
    # the feature cache keys the two apart, and an archive's recorded weights rebuild the same backbone
    from landlens.features.cache import store_path
    from landlens.retrieval.extractor import weights_argument

    assert store_path("c", "d", ["x.png"], [0], a, "r") != store_path("c", "d", ["x.png"], [0], b, "r")
    rebuilt = create_backbone(a.name, weights_argument(a.weights.to_dict()), preprocessing=a.preprocessing)
    assert rebuilt.weights.digest == a.weights.digest
    assert weights_argument({"source": "hub", "ref": "openclip/laion2b_s34b_b79k"}) == "hub:laion2b_s34b_b79k"


def test_hub_tags_bring_their_preprocessing_and_quickgelu(oc: Any, vit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hub:TAG`` (offline here: open_clip's download is replaced by the local file): the tag's
    mean/std/resize rule and its QuickGELU activation, which a checkpoint does not record."""
    model, files = vit
    tag_cfg = {"hf_hub": "org/tiny/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
               "resize_mode": "squash", "quick_gelu": True}
    monkeypatch.setattr(oc, "get_pretrained_cfg", lambda arch, tag: dict(tag_cfg) if tag == "tiny_tag" else {})
    monkeypatch.setattr(oc, "download_pretrained", lambda cfg, **kw: str(files["model.safetensors"]))
    bb = create_backbone(f"openclip:{VIT}", weights="hub:tiny_tag")
    assert (bb.weights.source, bb.weights.ref) == ("hub", "openclip/tiny_tag")
    pre = bb.preprocessing
    assert (pre.input_size, pre.resize_mode, pre.interpolation, pre.mean) == (32, "squash", "bilinear", (0.5,) * 3)
    torch.manual_seed(0)
    quick = oc.create_model(VIT, pretrained=None, pretrained_hf=False, force_quick_gelu=True).eval()
    quick.load_state_dict(model.state_dict())
    x, _ = images(32)
    with torch.inference_mode():
        torch.testing.assert_close(bb(x), quick.encode_image(x), atol=1e-5, rtol=0)
        assert not torch.allclose(bb(x), model.encode_image(x), atol=1e-3)
    tower = create_text_tower(f"openclip:{VIT}", "hub:tiny_tag")
    assert (tower.info.source, tower.info.ref) == ("hub", "tiny_tag")  # like a Hugging Face tower: hub:REF
    from landlens.retrieval.extractor import weights_argument

    assert weights_argument(bb.weights.to_dict()) == "hub:tiny_tag"
    again = create_backbone(f"openclip:{VIT}", weights="hub:openclip/tiny_tag")  # the recorded ref works too
    assert again.weights.digest == bb.weights.digest

    def offline(cfg: Any, **kw: Any) -> str:
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(oc, "download_pretrained", offline)
    with pytest.raises(WeightsError, match=rf"cannot fetch open_clip weights {VIT}/tiny_tag \(We couldn't connect.*weights=PATH"):
        create_backbone(f"openclip:{VIT}", weights="hub:tiny_tag")


def test_wrong_architecture_or_missing_tensors_are_refused(oc: Any, vit: Any, tmp_path: Path) -> None:
    model, files = vit
    path = files["plain.pt"]
    with pytest.raises(WeightsError, match=rf"{path.name}.*does not fit open_clip {RN}.*missing") as info:
        create_backbone(f"openclip:{RN}", weights=str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match=rf"does not fit open_clip {VIT_WIDE}.*wrong shape"):
        create_text_tower(f"openclip:{VIT_WIDE}", weights=str(path))
    sd = dict(model.state_dict())
    sd.pop("visual.proj")
    sd["extra.weight"] = torch.zeros(1)
    broken = save_layout(sd, tmp_path / "broken.pt")
    with pytest.raises(WeightsError, match=r"broken\.pt does not fit .*1 missing \(e\.g\. visual\.proj\).*1 unexpected"):
        create_backbone(f"openclip:{VIT}", weights=str(broken))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; still what OpenAI's files are
def test_torchscript_archives_are_refused_unread(oc: Any, tmp_path: Path) -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    from landlens.models.openclip import is_torchscript_archive

    assert is_torchscript_archive(path)
    with pytest.raises(WeightsError, match=r"ViT-B-32\.pt is a TorchScript archive.*hub:openai.*open_clip_pytorch_model\.bin"):
        create_backbone(f"openclip:{VIT}", weights=str(path))
    with pytest.raises(WeightsError, match="TorchScript"):
        create_text_tower(f"openclip:{VIT}", weights=str(path))
    plain = tmp_path / "plain.pt"
    torch.save(Tiny().state_dict(), plain)
    assert not is_torchscript_archive(plain)


def test_pickled_objects_are_never_loaded(oc: Any, vit: Any, tmp_path: Path) -> None:
    import argparse

    model, _ = vit
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(WeightsError, match=r"with_args\.pt.*Python objects besides tensors.*argparse\.Namespace"):
        create_backbone(f"openclip:{VIT}", weights=str(path))


def test_user_errors_are_one_line(oc: Any, vit: Any, tmp_path: Path) -> None:
    _, files = vit
    missing = tmp_path / "RemoteCLIP-ViT-B-32.pt"
    with pytest.raises(WeightsError, match=rf"weights file not found: .*RemoteCLIP-ViT-B-32\.pt \(for openclip:{VIT}\)"):
        create_backbone(f"openclip:{VIT}", weights=str(missing))
    with pytest.raises(WeightsError, match=r"weights file not found: .*\(for openclip:"):
        create_text_tower(f"openclip:{VIT}", weights=f"file:{missing}")
    with pytest.raises(WeightsError, match=r"no default or packaged weights.*hub:TAG"):
        create_backbone(f"openclip:{VIT}")
    with pytest.raises(WeightsError, match=r"unknown open_clip tag 'nope' for openclip:ViT-B-32 \(open_clip tags.*openai"):
        create_backbone("openclip:ViT-B-32", weights="hub:nope")
    with pytest.raises(BackboneError, match="unknown open_clip architecture 'ViT-B-33'; did you mean ViT-B-32"):
        create_backbone("openclip:ViT-B-33", weights=str(files["plain.pt"]))
    with pytest.raises(BackboneError, match="give the open_clip architecture"):
        create_backbone("openclip:", weights=str(files["plain.pt"]))
    with pytest.raises(WeightsError, match="random weights"):
        create_text_tower(f"openclip:{VIT}", weights="none")
    with pytest.raises(BackboneError, match="is an open_clip model"):
        get_spec("openclip:ViT-B-32")
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("hello")
    with pytest.raises(WeightsError, match=rf"cannot read weights file .*notes\.pt.*\(for openclip:{VIT}\)"):
        create_backbone(f"openclip:{VIT}", weights=str(not_weights))


def test_names_and_random_init(oc: Any) -> None:
    bb = create_backbone(f"openclip:{VIT.lower()}", weights="none")  # open_clip's spelling is found
    assert bb.name == f"openclip:{VIT}" and bb.weights.source == "none" and bb.weights.digest is None
    from landlens.models.openclip import parse_arch

    assert parse_arch("openclip:ViT-B/32") == "ViT-B-32" and parse_arch(" OPENCLIP:vit-l-14 ") == "ViT-L-14"


def test_without_open_clip_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(WeightsError, match=r"open_clip_torch package: pip install 'landlens\[clip\]'"):
        create_backbone("openclip:ViT-B-32", weights="x.pt")
    with pytest.raises(WeightsError, match=r"pip install 'landlens\[clip\]'"):
        create_text_tower("openclip:ViT-B-32", weights="x.pt")
