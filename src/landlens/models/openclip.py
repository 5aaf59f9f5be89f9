"""CLIP-family models through open_clip: the image tower as a backbone, the text tower as a text tower.

Remote-sensing CLIP models (RemoteCLIP, GeoRSCLIP, SkyCLIP) and OpenAI's CLIP are published as
checkpoints of open_clip architectures (Cherti et al., "Reproducible scaling laws for contrastive
language-image learning", CVPR 2023; Radford et al., "Learning transferable visual models from
natural language supervision", ICML 2021). One name, ``openclip:ARCH`` (``ARCH`` an open_clip
model config such as ``RN50``, ``ViT-B-32``, ``ViT-L-14``, or their ``-quickgelu`` variants;
``ViT-B/32`` is read as ``ViT-B-32``), gives

- :func:`openclip_backbone` (``create_backbone("openclip:ARCH", weights)``): images to the CLIP
  image embedding, ``encode_image`` (after the visual projection, not normalised), with the
  preprocessing open_clip's configuration implies (size, mean/std, interpolation, resize rule);
- :func:`openclip_text_tower` (``create_text_tower("openclip:ARCH", weights)``): sentences to
  L2-normalised ``encode_text`` vectors (:class:`OpenClipTextTower`).

Weights: a local checkpoint (``weights=PATH`` or ``file:PATH``), ``hub:TAG`` (an open_clip
pretrained tag such as ``openai`` or ``laion2b_s34b_b79k``, downloaded by open_clip when online),
or ``none`` (random, image tower only). A checkpoint is read without unpickling code
(:func:`~landlens.models.weights.read_checkpoint`: safetensors or ``torch.load(weights_only=True)``)
in any published layout: a plain state dict (RemoteCLIP, GeoRSCLIP, ``open_clip_pytorch_model.bin``),
an open_clip training checkpoint (``{"state_dict": {"module.…": …}, "optimizer": …}``, SkyCLIP),
or ``.safetensors``; it is then loaded with ``load_state_dict(strict=True)``. OpenAI's original
TorchScript archives hold code and are refused (use ``hub:openai`` or ``open_clip_pytorch_model.bin``).

A local file gets open_clip's default preprocessing for the architecture (OpenAI mean/std,
bicubic, shortest side + centre crop), as ``open_clip.create_model(ARCH, pretrained=PATH)`` does;
a hub tag adds its own (and its QuickGELU setting). Pass ``preprocessing=`` where a model's
authors normalise otherwise. The GELU/QuickGELU choice is not stored in a checkpoint: it is the
architecture name's (``ViT-B-32`` vs ``ViT-B-32-quickgelu``).

open_clip is imported on first use; without it every entry point raises one :class:`WeightsError`
naming ``pip install 'landlens[clip]'``.
"""

from __future__ import annotations

import difflib
import logging
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landlens.errors import BackboneError, WeightsError, first_line
from landlens.hashing import cached_file_digest
from landlens.models.base import Backbone, BackboneSpec, TextEncoder, TextTowerInfo, WeightsInfo
from landlens.models.preprocessing import Preprocessing
from landlens.models.weights import read_checkpoint, state_dict_digest, state_dict_mismatch

OPENCLIP_PREFIX = "openclip:"
INSTALL_HINT = "pip install 'landlens[clip]'"

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # in state dicts taken from OpenAI's JIT files
_RESIZE_MODES = {"shortest": "crop", "squash": "squash"}  # open_clip's eval resize -> landlens resize_mode


def is_openclip_reference(name: str | None) -> bool:
    """Whether a backbone or text-tower name is ``openclip:ARCH``."""
    return isinstance(name, str) and name.strip().lower().startswith(OPENCLIP_PREFIX)


def import_open_clip() -> Any:
    """The ``open_clip`` module, or one :class:`WeightsError` saying how to install it."""
    try:
        import open_clip
    except ImportError:
        raise WeightsError(f"CLIP-family models need the open_clip_torch package: {INSTALL_HINT}") from None
    return open_clip


def parse_arch(name: str) -> str:
    """The open_clip architecture of ``openclip:ARCH`` (``/`` read as ``-``, case as open_clip spells it).

    Raises:
        BackboneError: not an ``openclip:`` name, or an architecture open_clip has no config for.
    """
    if not is_openclip_reference(name):
        raise BackboneError(f"{name!r} is not an open_clip name (expected {OPENCLIP_PREFIX}ARCH, e.g. openclip:ViT-B-32)")
    arch = name.strip()[len(OPENCLIP_PREFIX):].strip().replace("/", "-")
    if not arch:
        raise BackboneError(f"backbone {name!r}: give the open_clip architecture after '{OPENCLIP_PREFIX}' "
                            f"(e.g. openclip:ViT-B-32)")
    known = import_open_clip().list_models()
    by_lower = {m.lower(): m for m in known}
    if arch.lower() in by_lower:
        return by_lower[arch.lower()]
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; open_clip.list_models() lists them"
    raise BackboneError(f"unknown open_clip architecture {arch!r}{hint}")


# --------------------------------------------------------------------------- where the weights come from


@dataclass(frozen=True)
class OpenClipSource:
    """Resolved weights: ``kind`` 'file' | 'hub' | 'none', the reference a backbone's
    :class:`WeightsInfo` records (resolved path, or ``'openclip/TAG'``), the local file, the hub
    tag and its open_clip pretrained config (preprocessing, QuickGELU), and how messages name it."""

    kind: str
    ref: str
    path: Path | None = None
    tag: str | None = None
    tag_cfg: Mapping[str, Any] | None = None
    what: str = ""


def resolve_weights(arch: str, weights: str) -> OpenClipSource:
    """Turn a ``weights`` string into an :class:`OpenClipSource` (downloading a hub tag when online).

    Raises:
        WeightsError: ``auto``/``package`` (no default or packaged weights exist), an unknown hub
            tag, a failed download, or a checkpoint path that is not a file.
    """
    w = (weights or "auto").strip()
    low = w.lower()
    if low in ("none", "random", "scratch"):
        return OpenClipSource("none", "random-init", what="random initialisation")
    if low in ("auto", "hub") or low.startswith("package"):
        raise WeightsError(f"openclip:{arch} has no default or packaged weights: give weights=PATH (a local "
                           f"checkpoint) or weights='hub:TAG' when online ({_tags_hint(arch)})")
    if low.startswith("hub:"):
        return _hub_source(arch, w[4:].strip())
    path = Path(w[5:] if low.startswith("file:") else w).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (for openclip:{arch})")
    return OpenClipSource("file", str(path.resolve()), path, what=f"weights file {path}")


def _tags_hint(arch: str) -> str:
    tags = import_open_clip().list_pretrained_tags_by_model(arch)
    return f"open_clip tags for {arch}: {', '.join(tags)}" if tags else f"open_clip has no tags for {arch}"


def _hub_source(arch: str, tag: str) -> OpenClipSource:
    tag = tag.removeprefix("openclip/")  # a backbone's recorded reference works too
    open_clip = import_open_clip()
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if not cfg:
        raise WeightsError(f"unknown open_clip tag {tag!r} for openclip:{arch} ({_tags_hint(arch)})")
    try:
        path = Path(open_clip.download_pretrained(cfg))
    except Exception as exc:  # noqa: BLE001 - offline, hub errors: one clear line
        raise WeightsError(f"cannot fetch open_clip weights {arch}/{tag} ({first_line(exc)}); offline, give "
                           f"weights=PATH to a local checkpoint") from None
    if not path.is_file():
        raise WeightsError(f"open_clip weights {arch}/{tag}: the download gave no file ({path})")
    return OpenClipSource("hub", f"openclip/{tag}", path, tag, dict(cfg), f"hub weights openclip/{tag} ({path})")


# --------------------------------------------------------------------------- reading a checkpoint


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript zip (OpenAI's original CLIP ``.pt`` files): it holds
    ``constants.pkl`` and a ``code/`` folder, which a ``torch.save`` zip never has."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except OSError:
        return False
    return any(n == "constants.pkl" or n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names)


def read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP checkpoint, wrappers (``state_dict``) and prefixes (``module.``) removed.

    Raises:
        WeightsError: a missing, unreadable or TorchScript file, naming it and the architecture.
    """
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (for openclip:{arch})")
    if is_torchscript_archive(path):
        raise WeightsError(f"{path} is a TorchScript archive (OpenAI's original CLIP release), which holds code "
                           f"landlens never runs; use weights='hub:openai' or its open_clip_pytorch_model.bin "
                           f"(for openclip:{arch})")
    try:
        sd = read_checkpoint(path)
    except WeightsError as exc:
        raise WeightsError(f"{exc} (for openclip:{arch})") from None
    for _ in range(len(_WRAPPER_PREFIXES)):
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str, arch: str) -> dict[str, torch.Tensor]:
    """``sd`` in ``model``'s layout, checked: every tensor of the model present with its shape.

    Follows ``open_clip.load_checkpoint`` where that only renames or reshapes (the older text-tower
    layout, a 0-d ``logit_scale``, keys OpenAI's files and older transformers add), never where it
    would change the network (no position-embedding resizing: another size is another architecture).

    Raises:
        WeightsError: missing, unexpected or wrongly shaped tensors, naming the file and architecture.
    """
    own = model.state_dict()
    sd = dict(sd)
    if "positional_embedding" in sd and "positional_embedding" not in own:
        sd = import_open_clip().model.convert_to_custom_text_state_dict(sd)
    for key in (*_OPENAI_EXTRAS, "text.transformer.embeddings.position_ids"):
        if key in sd and key not in own:
            del sd[key]
    for key in ("logit_scale", "logit_bias"):
        if key in sd and key in own and sd[key].shape != own[key].shape and sd[key].numel() == own[key].numel():
            sd[key] = sd[key].reshape(own[key].shape)
    for key in own:  # BatchNorm counters (RN50) do not change outputs; older files lack them
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = own[key]
    problem = state_dict_mismatch(own, sd)
    if problem:
        raise WeightsError(f"{what} does not fit open_clip {arch}: {problem} (a checkpoint of another architecture?)")
    return sd


# --------------------------------------------------------------------------- building the model


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs that a model built without weights is random; landlens loads them next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    root = logging.getLogger()
    f = _DropRandomInitNotice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def build_model(arch: str, *, quick_gelu: bool = False) -> nn.Module:
    """The open_clip model ``arch`` with random weights, in eval mode (nothing is downloaded)."""
    open_clip = import_open_clip()
    try:
        with _quiet_random_init():
            model = open_clip.create_model(arch, pretrained=None, device="cpu", force_quick_gelu=quick_gelu,
                                           pretrained_image=False, pretrained_hf=False)
    except Exception as exc:  # noqa: BLE001 - e.g. a Hugging Face text config that needs the hub
        raise WeightsError(f"cannot build open_clip {arch}: {first_line(exc)}") from None
    return model.eval()


def openclip_preprocessing(cfg: Mapping[str, Any], arch: str = "") -> Preprocessing:
    """The landlens :class:`Preprocessing` of an open_clip preprocess config (``PreprocessCfg`` fields).

    open_clip's evaluation transform is ``Resize(size)`` (shortest side, ``interpolation``) +
    ``CenterCrop(size)`` for ``resize_mode='shortest'``, or ``Resize((size, size))`` for
    ``'squash'``; then ``Normalize(mean, std)``. Those are landlens's ``'crop'`` with
    ``crop_pct=1`` and ``'squash'``.

    Raises:
        WeightsError: a rule landlens cannot reproduce (``'longest'`` letterboxing, a non-square size).
    """
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or int(size[0]) != int(size[1]):
            raise WeightsError(f"open_clip {arch}: non-square input size {tuple(size)} is not supported")
        size = size[0]
    mode = str(cfg.get("resize_mode", "shortest"))
    if mode not in _RESIZE_MODES:
        raise WeightsError(f"open_clip {arch}: resize_mode {mode!r} has no landlens equivalent "
                           f"(supported: {', '.join(_RESIZE_MODES)}); pass preprocessing= explicitly")
    mean = tuple(float(v) for v in cfg.get("mean", import_open_clip().OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", import_open_clip().OPENAI_DATASET_STD))
    try:
        return Preprocessing(input_size=int(size), crop_pct=1.0, resize_mode=_RESIZE_MODES[mode],  # type: ignore[arg-type]
                             interpolation=str(cfg.get("interpolation", "bicubic")), mean=mean, std=std)
    except ValueError as exc:
        raise WeightsError(f"open_clip {arch}: unsupported preprocessing ({exc})") from None


def _model_preprocess_cfg(model: nn.Module, tag_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    cfg.setdefault("size", getattr(visual, "image_size", 224))
    for key in ("mean", "std"):
        legacy = getattr(visual, f"image_{key}", None)
        if legacy is not None:
            cfg.setdefault(key, legacy)
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if tag_cfg and key in tag_cfg:
            cfg[key] = tag_cfg[key]
    return cfg


@dataclass
class LoadedClip:
    """A CLIP model with its weights loaded, and where they came from."""

    model: nn.Module
    arch: str
    source: OpenClipSource
    file_sha256: str | None

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        return _model_preprocess_cfg(self.model, self.source.tag_cfg)


def load_clip(name: str, weights: str) -> LoadedClip:
    """Build ``openclip:ARCH`` and load ``weights`` strictly (see the module docstring).

    Raises:
        BackboneError: an unknown architecture.
        WeightsError: open_clip missing, weights that cannot be found, read or fitted.
    """
    arch = parse_arch(name)
    source = resolve_weights(arch, weights)
    open_clip = import_open_clip()
    arch_quick = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    quick = bool(source.tag_cfg and source.tag_cfg.get("quick_gelu", False)) and not arch_quick
    sd = read_state_dict(source.path, arch) if source.path is not None else None
    model = build_model(arch, quick_gelu=quick)
    if sd is None:
        return LoadedClip(model, arch, source, None)
    model.load_state_dict(fit_state_dict(model, sd, source.what, arch), strict=True)
    return LoadedClip(model.eval(), arch, source, cached_file_digest(source.path))


# --------------------------------------------------------------------------- the two towers


@torch.inference_mode()
def _check_image_tower(body: nn.Module, size: int, dim: int, what: str) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1234))
    try:
        out = body(x)
    except RuntimeError as exc:  # e.g. a ViT's fixed position embedding and another input size
        raise WeightsError(f"{what}: the image tower cannot run on {size}x{size} inputs ({first_line(exc)})") from None
    if out.ndim != 2 or out.shape[1] != dim:
        raise WeightsError(f"{what}: the image tower gives {tuple(out.shape)} instead of (2, {dim})")
    if not torch.isfinite(out).all():
        raise WeightsError(f"{what}: the loaded image tower produces non-finite outputs")


def openclip_backbone(name: str, weights: str = "auto", *, preprocessing: Preprocessing | None = None,
                      verify: bool = True) -> Backbone:
    """The image tower of ``openclip:ARCH`` as a :class:`Backbone` (what ``create_backbone`` returns).

    Its forward is open_clip's ``encode_image`` (the projected embedding, not normalised); its
    preprocessing comes from open_clip's config (:func:`openclip_preprocessing`) unless
    ``preprocessing`` is given; its :class:`WeightsInfo` digest is over the image tower's loaded
    tensors (:func:`~landlens.models.weights.state_dict_digest`; the file's sha256 besides), so
    two checkpoints with the same image tower give the same cached features. ``verify`` runs
    the tower once on a fixed input (shape and finiteness); the strict load already guarantees
    that every parameter came from the file.

    Raises:
        BackboneError: an unknown architecture.
        WeightsError: see :func:`load_clip`, or a tower whose outputs are wrong.
    """
    loaded = load_clip(name, weights)
    open_clip = import_open_clip()
    cfg = open_clip.get_model_config(loaded.arch) or {}
    dim = int(cfg.get("embed_dim") or loaded.model.visual.output_dim)
    pre = preprocessing or openclip_preprocessing(loaded.preprocess_cfg, loaded.arch)
    body = loaded.model.visual.eval()
    spec = BackboneSpec(f"{OPENCLIP_PREFIX}{loaded.arch}", "openclip", loaded.arch, f"CLIP {loaded.arch} image tower",
                        note=f"open_clip {loaded.arch}: {dim}-d image embedding (encode_image, not normalised)")
    src = loaded.source
    if src.kind == "none":
        return Backbone(spec, body, dim, pre, WeightsInfo("none", "random-init"))
    if verify:
        _check_image_tower(body, pre.input_size, dim, src.what)
    info = WeightsInfo(src.kind, src.ref, state_dict_digest(body.state_dict()), loaded.file_sha256)
    return Backbone(spec, body, dim, pre, info)


class OpenClipTextTower(TextEncoder):
    """The text tower of a CLIP model: open_clip's tokenizer (padding/truncation to the context
    length) and ``encode_text``, L2-normalised by :meth:`~landlens.models.base.TextEncoder.encode`."""

    def __init__(self, tokenizer: Any, model: nn.Module, info: TextTowerInfo) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.info = info

    def embed(self, sentences: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(sentences))


def _text_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the text embedding depends on (no image tower, no logit scale or bias)."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def openclip_text_tower(name: str, weights: str) -> OpenClipTextTower:
    """The text tower of ``openclip:ARCH`` (what ``create_text_tower("openclip:ARCH", weights)`` returns).

    ``weights``: a checkpoint path (``file:PATH``) or ``hub:TAG``; random weights are refused
    (their vectors mean nothing). The info's ``ref`` is the resolved path or the tag (as for the
    Hugging Face towers, ``hub:`` + ref loads it again), its digest is over the text tower's
    tensors, and its ``extra`` records the architecture and the file's sha256.

    Raises:
        BackboneError: an unknown architecture.
        WeightsError: see :func:`load_clip`, ``weights='none'``, or a tokenizer that cannot be built.
    """
    if (weights or "").strip().lower() in ("none", "random", "scratch"):
        raise WeightsError(f"text tower {name!r}: random weights give meaningless vectors; give weights=PATH "
                           f"or weights='hub:TAG'")
    loaded = load_clip(name, weights)
    open_clip = import_open_clip()
    try:
        tokenizer = open_clip.get_tokenizer(loaded.arch)
    except Exception as exc:  # noqa: BLE001 - a Hugging Face tokenizer that needs the hub, offline
        raise WeightsError(f"cannot build the tokenizer of open_clip {loaded.arch}: {first_line(exc)}") from None
    model = loaded.model
    digest = state_dict_digest(_text_state(model))
    model.visual = nn.Identity()  # the text tower does not need the image tower's memory
    cfg = open_clip.get_model_config(loaded.arch) or {}
    text_cfg = cfg.get("text_cfg", {})
    max_length = int(getattr(tokenizer, "context_length", None) or text_cfg.get("context_length", 77))
    pool = str(getattr(model, "text_pool_type", None) or text_cfg.get("pool_type", "argmax"))
    pooling = "clip-eot" if pool == "argmax" else f"clip-{pool}"
    src = loaded.source
    ref = src.tag if src.kind == "hub" and src.tag else src.ref
    info = TextTowerInfo(f"{OPENCLIP_PREFIX}{loaded.arch}", src.kind, ref, digest, int(cfg["embed_dim"]),
                         max_length, pooling, {"arch": loaded.arch, "file_sha256": loaded.file_sha256})
    return OpenClipTextTower(tokenizer, model, info)


__all__ = [
    "INSTALL_HINT",
    "OPENCLIP_PREFIX",
    "LoadedClip",
    "OpenClipSource",
    "OpenClipTextTower",
    "build_model",
    "fit_state_dict",
    "import_open_clip",
    "is_openclip_reference",
    "is_torchscript_archive",
    "load_clip",
    "openclip_backbone",
    "openclip_preprocessing",
    "openclip_text_tower",
    "parse_arch",
    "read_state_dict",
    "resolve_weights",
]
