"""The named backbones and how to build their architectures with random weights.

:func:`get_spec` resolves a name (a landlens name, an alias, or any timm model name) to a
:class:`~landlens.models.base.BackboneSpec`; :func:`build_body` builds its architecture
(timm, torchvision, the GeoEmbed ResNet-18, or a hand-crafted descriptor) and
:func:`default_preprocessing` gives the preprocessing of its default hub weights. Loading
weights is :mod:`landlens.models.weights`; the one door is
:func:`landlens.models.registry.create_backbone`.
"""

from __future__ import annotations

from torch import nn

from landlens.errors import BackboneError
from landlens.models.base import AlexNetFc7, BackboneSpec, Pooled
from landlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

def _build_torchvision(arch: str, transform_input: bool) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    if arch == "mobilenet_v2":
        net = tvm.mobilenet_v2(weights=None)
        net.classifier = nn.Identity()
        return net, 1280
    if arch == "squeezenet1_1":
        return Pooled(tvm.squeezenet1_1(weights=None).features), 512
    if arch == "googlenet":
        net = tvm.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=transform_input)
        net.fc = nn.Identity()
        return net, 1024
    if arch == "alexnet":
        return AlexNetFc7(tvm.alexnet(weights=None)), 4096
    raise BackboneError(f"no torchvision builder for {arch!r}")


def _build_landlens(arch: str) -> tuple[nn.Module, int]:
    if arch == "geoembed_v3":
        from landlens.models.geoembed import GeoEmbedV3

        net = GeoEmbedV3()
        return net, int(net.num_features)
    raise BackboneError(f"no landlens builder for {arch!r}")


def _build_handcrafted(arch: str, preprocessing: Preprocessing) -> tuple[nn.Module, int]:
    from landlens.models.handcrafted import build_descriptor

    return build_descriptor(arch, preprocessing)


def _build_timm(arch: str) -> tuple[nn.Module, int]:
    import timm

    try:
        net = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise BackboneError(f"unknown backbone {arch!r}: {exc}") from None
    dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    return net, dim


# --------------------------------------------------------------------------- the named backbones

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
    if name.strip().lower().startswith("openclip:"):
        raise BackboneError(f"{name!r} is an open_clip model, not a timm or torchvision architecture: build it "
                            f"with create_backbone({name!r}, weights=PATH)")
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


__all__ = ["build_body", "default_preprocessing", "get_spec", "list_backbones"]
