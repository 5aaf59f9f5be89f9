"""Classification losses on LOG-probabilities.

Every landlens head ends with log-softmax (:mod:`landlens.models.heads`), so every loss here
takes log-probabilities ``logp`` of shape (B, C) and integer targets ``y`` of shape (B,), and
returns the mean over the batch (a scalar).

- ``nll``: negative log-likelihood ``-logp[i, y_i]`` (the ResNet50-TL study's log-softmax + NLL).
- ``ce``: cross-entropy. On log-softmax outputs cross-entropy *is* the negative log-likelihood,
  so ``ce`` and ``nll`` compute the same number; both names exist because papers use both.
- ``label_smoothing``: cross-entropy against the smoothed target ``(1 - s) onehot(y) + s / C``
  (Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016,
  Sec. 7); equal to ``torch.nn.CrossEntropyLoss(label_smoothing=s)`` on the logits.
- ``ice``: the improved cross-entropy of Bahri et al., "Remote Sensing Image Classification via
  Improved Cross-Entropy Loss and Transfer Learning Strategy Based on Deep Convolutional Neural
  Networks", IEEE GRSL 17(6):1087-1091, 2020 (doi:10.1109/LGRS.2019.2937872), the NASNet-Mobile
  study: cross-entropy plus a penalty, the gap between the largest predicted probability and
  the true class's probability (see :class:`ImprovedCrossEntropy`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from landlens.errors import ConfigError

LOSS_NAMES = ("nll", "ce", "label_smoothing", "ice")


def _check_inputs(logp: torch.Tensor, target: torch.Tensor) -> None:
    if logp.ndim != 2 or target.ndim != 1 or logp.shape[0] != target.shape[0]:
        raise ValueError(f"expected log-probabilities (B, C) and targets (B,), got {tuple(logp.shape)} "
                         f"and {tuple(target.shape)}")


class NLLLoss(nn.Module):
    """Negative log-likelihood ``mean_i(-logp[i, y_i])`` of log-probabilities."""

    def forward(self, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logp, target)
        return F.nll_loss(logp, target)


class CrossEntropyLoss(NLLLoss):
    """Cross-entropy of log-probabilities: ``mean_i(-sum_j q_ij logp_ij)`` with one-hot ``q``.

    With one-hot targets this is exactly :class:`NLLLoss` (``-logp[i, y_i]``); on log-softmax
    outputs it equals ``torch.nn.functional.cross_entropy`` on the logits.
    """


class LabelSmoothingLoss(nn.Module):
    """Cross-entropy against the smoothed target ``q = (1 - s) onehot(y) + s / C``.

    ``loss_i = (1 - s) (-logp[i, y_i]) + s * mean_j(-logp[i, j])`` (Szegedy et al., CVPR 2016,
    Sec. 7), the same value as ``F.cross_entropy(logits, y, label_smoothing=s)``.

    Args:
        smoothing: ``s`` in [0, 1).
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        s = float(smoothing)
        if not (math.isfinite(s) and 0.0 <= s < 1.0):
            raise ConfigError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = s

    def forward(self, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logp, target)
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        uniform = -logp.mean(dim=1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * uniform).mean()

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"


class ImprovedCrossEntropy(nn.Module):
    """Improved cross-entropy (ICE) of Bahri et al., IEEE GRSL 2020 (doi:10.1109/LGRS.2019.2937872).

    Cross-entropy plus a penalty that grows with how far the true class is behind the
    predicted one, to focus training on hard (misclassified) images:

    ``p = clip(exp(logp), eps, 1 - eps)``

    ``loss_i = -log(p[i, y_i]) + w * (max_j p[i, j] - p[i, y_i])``

    and the loss is ``mean_i loss_i``. The penalty is zero when the prediction is right
    (``argmax_j p[i, j] == y_i``). Because of the clipping, a probability of exactly 1 gives
    ``-log(1 - eps)`` (not 0) and a probability of 0 gives ``-log(eps)`` (not infinity), and no
    gradient flows through a clipped probability.

    Args:
        eps: clipping bound, in (0, 0.5).
        ice_weight: ``w``, the weight of the penalty term (>= 0; the paper uses 1).
    """

    def __init__(self, eps: float = 1e-7, ice_weight: float = 1.0) -> None:
        super().__init__()
        e, w = float(eps), float(ice_weight)
        if not (math.isfinite(e) and 0.0 < e < 0.5):
            raise ConfigError(f"ice eps must be in (0, 0.5), got {eps}")
        if not (math.isfinite(w) and w >= 0.0):
            raise ConfigError(f"ice weight must be a finite number >= 0, got {ice_weight}")
        self.eps = e
        self.ice_weight = w

    def forward(self, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logp, target)
        p = logp.exp().clamp(self.eps, 1.0 - self.eps)
        p_true = p.gather(1, target[:, None]).squeeze(1)
        gap = p.max(dim=1).values - p_true
        return (-torch.log(p_true) + self.ice_weight * gap).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}, ice_weight={self.ice_weight}"


def build_loss(name: str, *, smoothing: float = 0.1, eps: float = 1e-7, ice_weight: float = 1.0) -> nn.Module:
    """A loss module by name: ``nll``, ``ce``, ``label_smoothing`` or ``ice`` (see the module docstring).

    Settings that the named loss does not use are ignored.

    Raises:
        ConfigError: an unknown name, or an invalid ``smoothing`` / ``eps`` / ``ice_weight``.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key == "nll":
        return NLLLoss()
    if key == "ce":
        return CrossEntropyLoss()
    if key == "label_smoothing":
        return LabelSmoothingLoss(smoothing)
    if key == "ice":
        return ImprovedCrossEntropy(eps=eps, ice_weight=ice_weight)
    raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")


__all__ = [
    "CrossEntropyLoss",
    "ImprovedCrossEntropy",
    "LOSS_NAMES",
    "LabelSmoothingLoss",
    "NLLLoss",
    "build_loss",
]
