"""Pre-activation residual units of the residual-dyad matching networks.

Paper: N. Khurshid, Mohbat, M. Taj, F. Z. Qureshi, "A Residual-Dyad Encoder Discriminator
Network for Remote Sensing Image Matching". Every block uses the *full pre-activation* ordering
of He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016): each
convolution is preceded by batch normalisation and ReLU, and the block's output is a plain sum
(no activation after the addition). With ``BR(x) = ReLU(BN(x))`` the residual branch is::

    F(phi) = W2 * BR(W1 * BR(phi))          (W1, W2: 3x3 convolutions, '*' convolution)

A **residual dyad** is two such blocks in cascade:

- block A (:class:`PreActBlock`), identity shortcut, stride 1::

      phi' = phi + F(phi)

- block B (:class:`PreActDownBlock`), a 3x3 convolution ``H`` on the shortcut, stride 2 (both
  ``H`` and ``F``'s first convolution ``W1`` have stride 2)::

      phi_next = H(phi') + F(phi')

The dyad keeps a skip connection in every block while only every other shortcut is an identity,
so the network is not a long chain of identity mappings; block B also changes the width and
halves the resolution (the encoder has no pooling). The decoder mirrors it with
:class:`ResidualDyadUp`, where ``H`` and ``W1`` of block B are stride-2 transposed convolutions
(:class:`PreActUpBlock`), doubling the resolution.

:class:`PreActResBlock` is the plain pre-activation residual block of the paper's ablations
(ResAE, ResDML): one block per stage, identity shortcut when the shape is kept, a 1x1
(projection) convolution shortcut when it changes (He et al.'s option B).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3(in_ch: int, out_ch: int, stride: int = 1, transpose: bool = False) -> nn.Module:
    """A bias-free 3x3 convolution (padding 1); transposed with ``stride > 1`` doubles the size exactly."""
    if transpose and stride > 1:
        return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=stride, padding=1, output_padding=stride - 1, bias=False)
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1(in_ch: int, out_ch: int, stride: int = 1, transpose: bool = False) -> nn.Module:
    """A bias-free 1x1 projection; transposed with ``stride > 1`` multiplies the size by ``stride``."""
    if transpose and stride > 1:
        return nn.ConvTranspose2d(in_ch, out_ch, 1, stride=stride, output_padding=stride - 1, bias=False)
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class _PreActUnit(nn.Module):
    """``out = shortcut(x) + F(x)`` with ``F(x) = conv2(BR(conv1(BR(x))))`` (He et al. 2016, Fig. 4e)."""

    def __init__(self, in_ch: int, out_ch: int, conv1: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.in_channels = int(in_ch)
        self.out_channels = int(out_ch)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.shortcut = shortcut

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch ``F(x) = W2 * BR(W1 * BR(x))``."""
        out = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class PreActBlock(_PreActUnit):
    """Block A of a residual dyad: ``phi' = phi + F(phi)``, identity shortcut, stride 1, ``channels`` kept.

    The shortcut is an :class:`~torch.nn.Identity` (no parameters), as in He et al. (2016).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, _conv3(channels, channels), nn.Identity())


class PreActDownBlock(_PreActUnit):
    """Block B of a residual dyad: ``phi_next = H(phi') + F(phi')``, stride 2.

    ``H`` is a 3x3 stride-2 convolution (``in_ch -> out_ch``) on the shortcut; ``F``'s first
    convolution also has stride 2, so the output is ``(out_ch, ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, _conv3(in_ch, out_ch, 2), _conv3(in_ch, out_ch, 2))


class PreActUpBlock(_PreActUnit):
    """Decoder block B: ``phi_next = H(phi') + F(phi')`` with ``H`` and ``F``'s first convolution
    3x3 stride-2 *transposed* convolutions (``in_ch -> out_ch``): the output is ``(out_ch, 2H, 2W)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, _conv3(in_ch, out_ch, 2, transpose=True),
                         _conv3(in_ch, out_ch, 2, transpose=True))


class ResidualDyad(nn.Module):
    """Residual-dyad unit (Khurshid et al.): block A then block B.

    ``phi' = phi + F_A(phi)``; ``phi_next = H(phi') + F_B(phi')`` with ``H`` a 3x3 stride-2
    convolution; maps ``(in_ch, H, W)`` to ``(out_ch, H/2, W/2)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block_a = PreActBlock(in_ch)
        self.block_b = PreActDownBlock(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_b(self.block_a(x))


class ResidualDyadUp(nn.Module):
    """Decoder residual dyad: block A (identity shortcut, stride 1) then :class:`PreActUpBlock`.

    ``phi' = phi + F_A(phi)``; ``phi_next = H^T(phi') + F_B^T(phi')`` with stride-2 transposed
    convolutions; maps ``(in_ch, H, W)`` to ``(out_ch, 2H, 2W)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block_a = PreActBlock(in_ch)
        self.block_b = PreActUpBlock(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_b(self.block_a(x))


class PreActResBlock(_PreActUnit):
    """Plain full pre-activation residual block (He et al. 2016) for the ResAE / ResDML ablations.

    ``out = S(x) + F(x)``, ``F(x) = W2 * BR(W1 * BR(x))`` where ``W1`` (3x3) has the block's
    ``stride`` (a stride-``s`` transposed convolution when ``transpose``, multiplying the size by
    ``s``) and ``S`` is the identity when the shape is kept, else a 1x1 projection with the same
    stride (transposed likewise).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, transpose: bool = False) -> None:
        stride = int(stride)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            shortcut = nn.Identity()
        else:
            shortcut = _conv1(in_ch, out_ch, stride, transpose)
        super().__init__(in_ch, out_ch, _conv3(in_ch, out_ch, stride, transpose), shortcut)
        self.stride = stride
        self.transpose = bool(transpose)


__all__ = [
    "PreActBlock",
    "PreActDownBlock",
    "PreActResBlock",
    "PreActUpBlock",
    "ResidualDyad",
    "ResidualDyadUp",
]
