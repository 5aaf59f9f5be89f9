"""Networks of the residual-dyad matching method: the ResDyadAE / ResAE autoencoders and the
ResDyadDML / ResDML pair discriminators.

Paper: N. Khurshid, Mohbat, M. Taj, F. Z. Qureshi, "A Residual-Dyad Encoder Discriminator
Network for Remote Sensing Image Matching". Images are described by the latent code ``z`` of an
autoencoder trained for reconstruction (MSE); a discriminator trained on pairs of such codes
(cross-entropy over {no match, match}) scores how well two images match.

**Autoencoder** (:class:`ResidualAutoencoder`, :class:`AEConfig`). For an ``S x S`` image the
encoder is a stem convolution of stride ``s = S / 64`` (3x3 for ``s <= 2``; ``(s+1) x (s+1)``
for ``s >= 4`` so that no pixel is skipped) to ``widths[0]`` channels at 64x64, then three
down-sampling stages with no pooling (``widths[0] -> widths[1] -> widths[2] -> latent``, each
halving the resolution), so the latent is always ``latent_channels`` maps of 8x8 (8x8x512 in
the paper). ``kind="resdyad"`` uses one residual dyad per stage (ResDyadAE); ``kind="res"`` one
plain pre-activation residual block with a projection shortcut (ResAE, the ablation). The
decoder mirrors the encoder with transposed convolutions and ends with a sigmoid, so
reconstructions are images in [0, 1]; the loss is the mean squared error
(:func:`reconstruction_loss`). The latent is the raw output of the last stage (pre-activation
networks apply BN-ReLU at the start of the next block, here the decoder's).

**Discriminator** (:class:`MatchingDiscriminator`, :class:`DMLConfig`). The two feature maps
``a, b`` of shape ``(C, H, W)`` (8x8x512 for the autoencoder's codes) are concatenated to
``(2C, H, W)``, then::

    conv3x3(2C -> width) -> BN -> ReLU -> residual dyad (width -> width, stride 2)
        -> BN -> ReLU -> conv3x3 (width -> width) -> ReLU -> fully connected -> 2 logits

(``kind="res"``: a plain pre-activation residual block instead of the dyad, ResDML). The
logits are {0: no match, 1: match}; training uses softmax cross-entropy on labelled pairs.
The first convolution is linear in its input, so it is stored as two convolutions,
``conv(cat(a, b)) = first_a(a) + first_b(b)`` (``first_a`` carries the bias). Scoring a query
against an archive can then apply ``first_b`` once per archive item and ``first_a`` once per
query (:mod:`landlens.matching.scoring`); the result is the same network.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from landlens.errors import ConfigError, FeatureMismatchError
from landlens.matching.units import PreActResBlock, ResidualDyad, ResidualDyadUp

#: Side of the autoencoder's latent maps (the paper's 8x8).
LATENT_SIZE = 8
#: Input side at which the encoder's stem has stride 1 (three stride-2 stages then reach 8x8).
BASE_INPUT = LATENT_SIZE * 8
KINDS = ("resdyad", "res")


def _positive_int(value: Any, what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}") from None
    if v != value or v < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return v


def _check_kind(kind: Any, what: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"{what} kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return str(kind)


def _from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}")
    kw = dict(d)
    if "widths" in kw and isinstance(kw["widths"], list):
        kw["widths"] = tuple(kw["widths"])
    return cls(**kw)


# ----------------------------------------------------------------------------- autoencoder

@dataclass(frozen=True)
class AEConfig:
    """Settings of a residual autoencoder.

    Attributes:
        kind: ``'resdyad'`` (ResDyadAE, residual dyads) or ``'res'`` (ResAE, plain residual blocks).
        input_size: image side ``S``; ``S / 64`` must be a power of two >= 1 (64, 128, 256, ...).
        in_channels: image channels (reconstructed channels too).
        widths: channels after the stem and after the first two down stages. The defaults are
            CPU-friendly; larger values (e.g. ``(64, 128, 256)``) approach the paper's network.
        latent_channels: ``n``, the number of 8x8 latent maps (512 in the paper).
    """

    kind: str = "resdyad"
    input_size: int = 64
    in_channels: int = 3
    widths: tuple[int, int, int] = (32, 64, 128)
    latent_channels: int = 512

    def __post_init__(self) -> None:
        _check_kind(self.kind, "autoencoder")
        size = _positive_int(self.input_size, "input_size")
        s = size // BASE_INPUT
        if size % BASE_INPUT or s & (s - 1):
            raise ConfigError(f"input_size {self.input_size!r} is not {BASE_INPUT} times a power of two "
                              f"(64, 128, 256, ...): the latent must be {LATENT_SIZE}x{LATENT_SIZE}")
        _positive_int(self.in_channels, "in_channels")
        if not isinstance(self.widths, (tuple, list)) or len(self.widths) != 3:
            raise ConfigError(f"widths must be 3 channel counts, got {self.widths!r}")
        for w in self.widths:
            _positive_int(w, "each of widths")
        _positive_int(self.latent_channels, "latent_channels")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    @property
    def stem_stride(self) -> int:
        """``s = input_size / 64``: the stride of the stem convolution."""
        return int(self.input_size) // BASE_INPUT

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.latent_channels), LATENT_SIZE, LATENT_SIZE)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_size": int(self.input_size), "in_channels": int(self.in_channels),
                "widths": [int(w) for w in self.widths], "latent_channels": int(self.latent_channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AEConfig":
        return _from_dict(cls, d, "autoencoder config")


def _stem_geometry(s: int) -> tuple[int, int]:
    """Kernel and padding of a stride-``s`` stem that maps ``64 s`` pixels to 64 without skipping any."""
    k = 3 if s <= 2 else s + 1
    return k, k // 2


class ResidualAutoencoder(nn.Module):
    """ResDyadAE (``kind='resdyad'``) or ResAE (``kind='res'``): image ``(B, C, S, S)`` <-> latent ``(B, n, 8, 8)``.

    Attributes:
        config: the :class:`AEConfig`.
        stem, down: encoder (stem convolution, three down-sampling stages).
        up, head: decoder (three up-sampling stages, BN-ReLU-(transposed) convolution to the
            image channels, then sigmoid).
    """

    def __init__(self, cfg: AEConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or AEConfig()
        self.config = cfg
        s = cfg.stem_stride
        k, p = _stem_geometry(s)
        w0, w1, w2 = cfg.widths
        n = cfg.latent_channels
        self.stem = nn.Conv2d(cfg.in_channels, w0, k, stride=s, padding=p, bias=False)
        chans = [(w0, w1), (w1, w2), (w2, n)]
        if cfg.kind == "resdyad":
            self.down = nn.Sequential(*[ResidualDyad(i, o) for i, o in chans])
            self.up = nn.Sequential(*[ResidualDyadUp(o, i) for i, o in reversed(chans)])
        else:
            self.down = nn.Sequential(*[PreActResBlock(i, o, 2) for i, o in chans])
            self.up = nn.Sequential(*[PreActResBlock(o, i, 2, transpose=True) for i, o in reversed(chans)])
        self.head_bn = nn.BatchNorm2d(w0)
        if s == 1:
            self.head = nn.Conv2d(w0, cfg.in_channels, k, padding=p)
        else:
            self.head = nn.ConvTranspose2d(w0, cfg.in_channels, k, stride=s, padding=p, output_padding=s - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent code ``(B, latent_channels, 8, 8)`` of images ``(B, in_channels, S, S)``."""
        size = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.config.in_channels, size, size):
            raise FeatureMismatchError(f"images of shape {tuple(x.shape[1:])} do not fit this autoencoder, "
                                       f"which takes {(self.config.in_channels, size, size)}")
        return self.down(self.stem(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(B, in_channels, S, S)`` in [0, 1] of latent codes ``(B, n, 8, 8)``."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.config.latent_shape:
            raise FeatureMismatchError(f"latent codes of shape {tuple(z.shape[1:])} do not fit this autoencoder, "
                                       f"which decodes {self.config.latent_shape}")
        y = self.up(z)
        return torch.sigmoid(self.head(torch.relu(self.head_bn(y))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, latent)``."""
        z = self.encode(x)
        return self.decode(z), z


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's training loss: mean squared error between reconstruction and image."""
    return F.mse_loss(reconstruction, images)


# ----------------------------------------------------------------------------- discriminator

@dataclass(frozen=True)
class DMLConfig:
    """Settings of a pair discriminator.

    Attributes:
        kind: ``'resdyad'`` (ResDyadDML, one residual dyad) or ``'res'`` (ResDML, one plain block).
        in_channels: channels ``C`` of each input feature map.
        spatial: side of each input map (8 for the autoencoder's codes; 1 for vector features
            ``(C,)`` seen as ``(C, 1, 1)``).
        width: channels of the first convolution and of the residual unit.
    """

    kind: str = "resdyad"
    in_channels: int = 512
    spatial: int = LATENT_SIZE
    width: int = 128

    def __post_init__(self) -> None:
        _check_kind(self.kind, "discriminator")
        _positive_int(self.in_channels, "in_channels")
        _positive_int(self.spatial, "spatial")
        _positive_int(self.width, "width")

    @property
    def features_shape(self) -> tuple[int, int, int]:
        return (int(self.in_channels), int(self.spatial), int(self.spatial))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_channels": int(self.in_channels), "spatial": int(self.spatial),
                "width": int(self.width)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DMLConfig":
        return _from_dict(cls, d, "discriminator config")


class MatchingDiscriminator(nn.Module):
    """ResDyadDML / ResDML: ``forward(a, b) -> (B, 2)`` logits {0: no match, 1: match}.

    ``a`` and ``b`` are ``(B, C, H, W)`` feature maps (or the same flattened to ``(B, C*H*W)``)
    with ``(C, H, W) = features_shape``. The first convolution on ``cat(a, b)`` is held as
    ``first_a`` (the ``a`` half of its weight, and its bias) and ``first_b`` (the ``b`` half, no
    bias); :meth:`tail` is everything after it.
    """

    def __init__(self, cfg: DMLConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DMLConfig()
        self.config = cfg
        c, w, s = cfg.in_channels, cfg.width, cfg.spatial
        self.first_a = nn.Conv2d(c, w, 3, padding=1, bias=True)
        self.first_b = nn.Conv2d(c, w, 3, padding=1, bias=False)
        self.bn_first = nn.BatchNorm2d(w)
        self.unit = ResidualDyad(w, w) if cfg.kind == "resdyad" else PreActResBlock(w, w, 2)
        self.bn_unit = nn.BatchNorm2d(w)
        self.conv_out = nn.Conv2d(w, w, 3, padding=1)
        side = (s + 1) // 2  # a 3x3 stride-2 convolution with padding 1 gives ceil(s / 2)
        self.fc = nn.Linear(w * side * side, 2)

    @property
    def features_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of each of the two inputs."""
        return self.config.features_shape

    @property
    def feature_dim(self) -> int:
        """``C * H * W``: the length of a flattened input row."""
        c, h, w = self.features_shape
        return c * h * w

    def as_feature_maps(self, x: torch.Tensor, what: str = "features") -> torch.Tensor:
        """``x`` as ``(B, C, H, W)``: accepts that shape or flattened rows ``(B, C*H*W)``.

        Raises:
            FeatureMismatchError: any other shape, naming the expected and the given one.
        """
        shape = self.features_shape
        if x.ndim == 4 and tuple(x.shape[1:]) == shape:
            return x
        if x.ndim == 2 and x.shape[1] == self.feature_dim:
            return x.reshape(x.shape[0], *shape)
        given = tuple(x.shape[1:]) if x.ndim >= 2 else tuple(x.shape)
        raise FeatureMismatchError(f"{what} of shape {given} do not fit this discriminator, which takes "
                                   f"(C, H, W) = {shape} maps or rows of {self.feature_dim} values")

    def concat_weight(self) -> torch.Tensor:
        """The weight ``(width, 2C, 3, 3)`` of the equivalent convolution on ``cat(a, b)``."""
        return torch.cat([self.first_a.weight, self.first_b.weight], dim=1)

    def concat_bias(self) -> torch.Tensor:
        """The bias of the equivalent convolution on ``cat(a, b)`` (that of ``first_a``)."""
        assert self.first_a.bias is not None
        return self.first_a.bias

    def from_concat_conv(self, conv: nn.Conv2d) -> "MatchingDiscriminator":
        """Load a 3x3 convolution on ``cat(a, b)`` into ``first_a`` / ``first_b``; returns ``self``."""
        c, w = self.config.in_channels, self.config.width
        expected = (w, 2 * c, 3, 3)
        if tuple(conv.weight.shape) != expected:
            raise ValueError(f"convolution weight {tuple(conv.weight.shape)} does not fit, expected {expected}")
        if conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError("the concatenated convolution must have stride 1, padding 1, no dilation or groups")
        with torch.no_grad():
            self.first_a.weight.copy_(conv.weight[:, :c])
            self.first_b.weight.copy_(conv.weight[:, c:])
            assert self.first_a.bias is not None
            if conv.bias is None:
                self.first_a.bias.zero_()
            else:
                self.first_a.bias.copy_(conv.bias)
        return self

    def tail(self, z: torch.Tensor) -> torch.Tensor:
        """Everything after the first convolution: ``z = first_a(a) + first_b(b)`` -> logits ``(B, 2)``."""
        x = torch.relu(self.bn_first(z))
        x = self.unit(x)
        x = torch.relu(self.conv_out(torch.relu(self.bn_unit(x))))
        return self.fc(x.flatten(1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = self.as_feature_maps(a, "first features")
        b = self.as_feature_maps(b, "second features")
        return self.tail(self.first_a(a) + self.first_b(b))

    def forward_concat(self, pair: torch.Tensor) -> torch.Tensor:
        """Logits of concatenated pairs ``(B, 2C, H, W)``: the network as one convolution on ``cat(a, b)``."""
        return self.tail(F.conv2d(pair, self.concat_weight(), self.concat_bias(), padding=1))


__all__ = [
    "AEConfig",
    "BASE_INPUT",
    "DMLConfig",
    "FeatureMismatchError",
    "LATENT_SIZE",
    "MatchingDiscriminator",
    "ResidualAutoencoder",
    "reconstruction_loss",
]
