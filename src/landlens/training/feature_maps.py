"""Activation maps of chosen layers, saved as image grids (the feature-map figures of the
ResNet50 transfer-learning study of scene classification).

:func:`list_layers` finds the sub-modules that produce 4-D ``(B, C, H, W)`` feature maps with
one dry forward pass; :func:`capture_feature_maps` records the outputs of named sub-modules
with forward hooks (always removed afterwards); :func:`save_feature_maps` writes one PNG grid
per layer with every channel min-max scaled on its own.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from landlens.errors import ConfigError

FEATURE_CELL_PX = 96
"""Display side of one channel in :func:`save_feature_maps` (small maps enlarged, nearest)."""


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype if p.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


def list_layers(model: nn.Module, *, input_size: int | None = None) -> list[str]:
    """Names of the sub-modules whose output is a 4-D tensor (a feature map), in the order
    they first run in a forward pass.

    The names are found with one dry forward pass of a zero ``(1, 3, s, s)`` input with a
    forward hook on every named sub-module (the model itself, name ``""``, is left out). ``s``
    is ``input_size`` when given, else 64, falling back to the model's own input size
    (``model.preprocessing.input_size`` if it has one, else 224) when the model refuses the
    small input.
    """
    sizes = [input_size] if input_size else [64]
    if not input_size:
        pre = getattr(model, "preprocessing", None)
        sizes.append(int(getattr(pre, "input_size", 224)))
    device, dtype = _model_device_dtype(model)
    last_exc: Exception | None = None
    for s in sizes:
        found: list[str] = []
        seen: set[str] = set()
        handles = []

        def make_hook(name: str):  # noqa: ANN202
            def hook(module: nn.Module, args: object, output: object) -> None:
                if name not in seen and isinstance(output, torch.Tensor) and output.ndim == 4:
                    seen.add(name)
                    found.append(name)

            return hook

        try:
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(make_hook(name)))
            with _inference(model):
                model(torch.zeros(1, 3, s, s, device=device, dtype=dtype))
            return found
        except RuntimeError as exc:  # e.g. the input is too small for the network's strides
            last_exc = exc
        finally:
            for h in handles:
                h.remove()
    assert last_exc is not None
    raise last_exc


def _unknown_layer_error(model: nn.Module, bad: Sequence[str]) -> ConfigError:
    names = [n for n, _ in model.named_modules() if n]
    hints: list[str] = []
    for b in bad:
        hints.extend(h for h in difflib.get_close_matches(b, names, n=3, cutoff=0.5) if h not in hints)
    if not hints:
        tops = [n for n in names if "." not in n]
        hints = tops[:8] if tops else names[:8]
    return ConfigError(
        f"unknown layer {', '.join(repr(b) for b in bad)}; valid names include: {', '.join(hints)} "
        f"(see list_layers)"
    )


def capture_feature_maps(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` (a normalised ``(1, 3, H, W)`` or ``(3, H, W)`` tensor) in eval
    mode without gradients and return the output of each named sub-module in ``layers``.

    Outputs are cloned when the hook runs, so a later in-place operation (``ReLU(inplace=True)``
    after a BatchNorm) cannot change what was captured. The hooks are removed and the
    module's training flag restored even if the forward pass fails. A sub-module that runs
    several times keeps its first output.

    Raises:
        ConfigError: a name in ``layers`` is not a sub-module of ``model`` (the message lists
            similar valid names), or the sub-module did not run or did not return a tensor.
    """
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ConfigError("no layers to capture; pick names from list_layers(model)")
    modules = dict(model.named_modules())
    bad = [name for name in layers if not name or name not in modules]
    if bad:
        raise _unknown_layer_error(model, bad)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected a (1, 3, H, W) input, got shape {tuple(x.shape)}")
    captured: dict[str, torch.Tensor] = {}
    not_tensor: set[str] = set()

    def make_hook(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: object, output: object) -> None:
            if name in captured:
                return
            if isinstance(output, torch.Tensor):
                captured[name] = output.detach().clone()
            else:
                not_tensor.add(name)

        return hook

    handles = []
    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        with _inference(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in captured]
    if missing:
        why = "did not return a tensor" if all(n in not_tensor for n in missing) else "did not run (or returned no tensor)"
        raise ConfigError(f"layer {', '.join(repr(n) for n in missing)} {why} in the forward pass")
    return {name: captured[name] for name in layers}


_VIRIDIS: np.ndarray | None = None


def _colormap() -> np.ndarray:
    """The 256-entry viridis lookup table as uint8 (256, 3)."""
    global _VIRIDIS
    if _VIRIDIS is None:
        from matplotlib import colormaps

        _VIRIDIS = (colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round().astype(np.uint8)
    return _VIRIDIS


def channel_images(fmap: torch.Tensor, max_channels: int = 32) -> list[np.ndarray]:
    """The first ``max_channels`` channels of a ``(1, C, H, W)`` or ``(C, H, W)`` map as
    ``H x W x 3`` uint8 viridis images, each min-max scaled on its own (a constant channel is
    shown at the bottom of the scale)."""
    t = fmap.detach().to("cpu", torch.float32)
    if t.ndim == 4:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"expected a (1, C, H, W) feature map, got shape {tuple(fmap.shape)}")
    t = t[: max(1, int(max_channels))]
    flat = t.reshape(t.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    scaled = torch.where(span > 0, (t - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(t))
    idx = (scaled * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    lut = _colormap()
    return [lut[c] for c in idx]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "layer"


def _input_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be a PIL image or an HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    return arr


def save_feature_maps(
    maps: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_channels: int = 32,
    image: Image.Image | np.ndarray | None = None,
) -> list[Path]:
    """Write one PNG grid per layer in ``maps`` to ``out_dir``: ``NN_<layer>.png``.

    Each grid shows the first ``max_channels`` channels of the layer's ``(1, C, H, W)`` output
    (first sample of the batch), each min-max normalised on its own and coloured with
    viridis, in :data:`FEATURE_CELL_PX` cells captioned with the channel index; the input
    ``image`` (PIL image or HxWx3 uint8 array) comes first when given. Returns the paths in
    the order of ``maps``.
    """
    from landlens.reports.figures import save_image_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = _input_array(image) if image is not None else None
    paths: list[Path] = []
    for i, (name, fmap) in enumerate(maps.items()):
        if fmap.ndim not in (3, 4):
            raise ConfigError(f"layer {name!r} output has shape {tuple(fmap.shape)}, not a (B, C, H, W) feature map")
        cells = channel_images(fmap, max_channels)
        titles = [f"ch {c}" for c in range(len(cells))]
        if first is not None:
            cells.insert(0, first)
            titles.insert(0, "input")
        ncols = math.ceil(math.sqrt(len(cells)))
        path = out / f"{i:02d}_{_safe_name(name)}.png"
        paths.append(save_image_grid(cells, path, ncols=ncols, titles=titles, cell_px=FEATURE_CELL_PX))
    return paths


__all__ = [
    "FEATURE_CELL_PX",
    "capture_feature_maps",
    "channel_images",
    "list_layers",
    "save_feature_maps",
]
