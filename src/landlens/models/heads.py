"""Classification heads on pooled backbone features; every head ends with log-softmax.

- ``linear``: (dropout) + one fully connected layer, the new layer of transfer learning
  (ResNet50-TL study: a new FC layer, log-softmax, NLL loss).
- ``mlp``: Linear - BatchNorm - ReLU - Dropout - Linear.
- ``se``: a squeeze-and-excitation attention head (Hu et al., "Squeeze-and-Excitation
  Networks", CVPR 2018, Eq. 2-4) applied to the pooled descriptor before the classifier, as
  in the NASNet-Mobile + improved cross-entropy study: ``s = sigmoid(W2 relu(W1 z))``,
  ``z' = z * s``, then dropout and a fully connected layer.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from landlens.errors import ConfigError

HEAD_KINDS = ("linear", "mlp", "se")


class LinearHead(nn.Module):
    """Dropout (optional) and one linear layer, then log-softmax."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.dropout(z)), dim=1)


class MLPHead(nn.Module):
    """Linear - BatchNorm - ReLU - Dropout - Linear, then log-softmax."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.dropout(self.hidden(z))), dim=1)


class SEHead(nn.Module):
    """Squeeze-and-excitation channel attention on the pooled descriptor, then a linear classifier.

    The pooled vector is already the "squeeze" (global average pooling) of SE-Net; the
    excitation ``s = sigmoid(W2 relu(W1 z))`` with ``W1: C -> C/r`` rescales each channel.
    """

    def __init__(self, in_features: int, num_classes: int, reduction: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        mid = max(1, in_features // max(1, reduction))
        self.excite = nn.Sequential(nn.Linear(in_features, mid), nn.ReLU(inplace=True),
                                    nn.Linear(mid, in_features), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        """The channel weights ``s`` in (0, 1), shape (B, C)."""
        return self.excite(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.dropout(z * self.excite(z))), dim=1)


def build_head(in_features: int, num_classes: int, kind: str = "linear", *, dropout: float = 0.0,
               hidden: int = 512, reduction: int = 16) -> nn.Module:
    """Build a head by name (see the module docstring); unused settings are ignored.

    Raises:
        ConfigError: an unknown ``kind``, ``dropout`` outside [0, 1), a non-positive ``hidden``
            or ``reduction``, fewer than 2 classes, or a value that is not a number.
    """
    if kind not in HEAD_KINDS:
        raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    if in_features <= 0 or num_classes < 2:
        raise ConfigError(f"a head needs in_features > 0 and at least 2 classes, got {in_features}, {num_classes}")
    p = _number(dropout, "head dropout", float)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"head dropout must be in [0, 1), got {dropout}")
    if kind == "linear":
        return LinearHead(in_features, num_classes, dropout=p)
    if kind == "mlp":
        width = _number(hidden, "mlp head hidden width", int)
        if width <= 0:
            raise ConfigError(f"mlp head hidden width must be positive, got {hidden}")
        return MLPHead(in_features, num_classes, hidden=width, dropout=p)
    r = _number(reduction, "se head reduction", int)
    if r <= 0:
        raise ConfigError(f"se head reduction must be positive, got {reduction}")
    return SEHead(in_features, num_classes, reduction=r, dropout=p)


def _number(value: object, what: str, kind: type) -> Any:
    """``kind(value)`` for a real number (an int setting must be whole), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if kind is int and (not math.isfinite(float(value)) or float(value) != int(value)):
        raise ConfigError(f"{what} must be a whole number, got {value!r}")
    return kind(value)


__all__ = ["HEAD_KINDS", "LinearHead", "MLPHead", "SEHead", "build_head"]
