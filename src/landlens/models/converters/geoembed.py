"""GeoEmbed v3 ``v3.npz`` -> :class:`landlens.models.geoembed.GeoEmbedV3` state dict.

Source: ``geoembed/weights/v3.npz`` in the PyPI package ``geoembed`` 1.1.2, read by
``geoembed/arch.py`` ``load_v3_netcl``: metadata ``embed_dim`` / ``base_channels`` /
``pool_size``, the backbone under ``bb.`` in PyTorch naming (``stem.0`` conv, ``stem.1`` BN,
``layerN.M.conv1|bn1|conv2|bn2``, shortcut ``short.0`` conv / ``short.1`` BN), and the head
``fc.weight`` stored as netcl's Linear keeps it, (in_features, out_features) = (8192, 256),
plus ``fc.bias``. The npz is opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from landlens.errors import WeightsError

_META = ("embed_dim", "base_channels", "pool_size")
_BLOCK = re.compile(r"^bb\.(layer[1-4]\.[01])\.(conv1|bn1|conv2|bn2|short\.0|short\.1)\.(.+)$")


def _rename(key: str) -> str | None:
    if key.startswith("bb.stem."):
        return key[3:]  # stem.0.weight, stem.1.running_mean ...
    m = _BLOCK.match(key)
    if m:
        block, layer, param = m.groups()
        layer = {"short.0": "downsample.0", "short.1": "downsample.1"}.get(layer, layer)
        return f"{block}.{layer}.{param}"
    return None


def convert_arrays(data: dict[str, np.ndarray], *, source: str = "<npz>") -> dict[str, torch.Tensor]:
    """Map the arrays of ``v3.npz`` onto :class:`GeoEmbedV3` keys (float32, contiguous)."""
    for k in _META:
        if k not in data:
            raise WeightsError(f"{source}: not a GeoEmbed v3 checkpoint (no {k!r})")
    embed_dim, base, pool = (int(np.asarray(data[k]).ravel()[0]) for k in _META)
    if (embed_dim, base, pool) != (256, 64, 4):
        raise WeightsError(
            f"{source}: GeoEmbed v3 with embed_dim={embed_dim}, base={base}, pool={pool}; "
            "landlens supports 256/64/4"
        )
    out: dict[str, torch.Tensor] = {}
    for key, arr in data.items():
        if key in _META:
            continue
        if key == "fc.weight":
            w = np.asarray(arr)
            if w.shape != (base * 8 * pool * pool, embed_dim):
                raise WeightsError(f"{source}: fc.weight has shape {w.shape}, expected (in, out)")
            out["fc.weight"] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
            continue
        if key == "fc.bias":
            out["fc.bias"] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            continue
        new = _rename(key)
        if new is None:
            raise WeightsError(f"{source}: unexpected array {key!r}")
        out[new] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return out


def convert(path: Path) -> dict[str, torch.Tensor]:
    """Read ``v3.npz`` (no pickle) and return a :class:`GeoEmbedV3` state dict.

    The result (102 tensors) loads with ``strict=True`` into ``GeoEmbedV3()``;
    ``num_batches_tracked`` buffers are not in the file and BatchNorm fills them in.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as exc:  # not a zip / npz, object arrays, truncated
        raise WeightsError(f"{path}: cannot read GeoEmbed npz: {exc}") from exc
    return convert_arrays(data, source=str(path))


__all__ = ["convert", "convert_arrays"]
