"""Transfer-learning strategies: which parts of a :class:`~landlens.models.classifier.Classifier` train.

A backbone is cut into ordered *stages*, from the input to the output (:func:`backbone_stages`);
every backbone parameter belongs to exactly one stage. The strategies of the studies are then:

- ``linear``: the backbone is a frozen feature extractor and only the new head trains (the
  "off-the-shelf features + new classifier" setting);
- ``partial``: the head and the last ``N`` backbone stages train, earlier stages stay frozen
  (fine-tuning the top of the network; Yosinski et al., "How transferable are features in
  deep neural networks?", NeurIPS 2014, show later layers are the least transferable);
- ``full``: every parameter trains (fine-tuning the whole network).

Stages follow the architecture's own coarse blocks: timm's ``group_matcher(coarse=True)``
(stem, then one group per stage/block, as timm uses for layer-wise learning-rate decay) for
timm models, and the equivalent blocks for torchvision and landlens models (see
:func:`backbone_stages`).

Frozen BatchNorm layers must not update their running statistics while the rest of the model
trains: :func:`freeze_batchnorm_eval` puts them back in eval mode after ``model.train()``.
:func:`param_groups` builds optimiser groups (head learning rate, backbone multiplier, no weight
decay on biases and normalisation parameters).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from landlens.errors import ConfigError

STRATEGIES = ("linear", "partial", "full")

_BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


class Stage(NamedTuple):
    """One coarse stage of a backbone.

    Attributes:
        name: a readable label made of module paths inside the backbone's body
            (``'layer4'``, ``'features.17-18'``, ``'blocks.6+conv_head+bn2'``).
        parameters: names of the stage's parameters, as in ``backbone.named_parameters()``.
    """

    name: str
    parameters: tuple[str, ...]


# --------------------------------------------------------------------------- stages


def _labels(groups: list[list[str]]) -> list[str]:
    """A label per group of parameter names: the distinct *owners* of its parameters, joined
    by ``+``, where a parameter's owner is its shortest module path that no other group uses
    (``'conv1+bn1'``, ``'blocks.6+conv_head+bn2'``, ``'features.denseblock1+features.transition1'``)."""
    users: dict[str, set[int]] = {}
    for g, names in enumerate(groups):
        for n in names:
            parts = n.split(".")
            for k in range(1, len(parts) + 1):
                users.setdefault(".".join(parts[:k]), set()).add(g)
    labels = []
    for names in groups:
        owners: list[str] = []
        for n in names:
            parts = n.split(".")
            owner = next((".".join(parts[:k]) for k in range(1, len(parts) + 1)
                          if len(users[".".join(parts[:k])]) == 1), n)
            if owner not in owners:
                owners.append(owner)
        labels.append("+".join(owners))
    return labels


def _timm_stages(body: nn.Module) -> list[tuple[str, list[str]]] | None:
    """timm's coarse parameter groups, in timm's order (stem first), or None if it has none."""
    matcher = getattr(body, "group_matcher", None)
    if matcher is None:
        return None
    try:
        from timm.models import group_parameters

        groups = group_parameters(body, matcher(coarse=True))
    except (NotImplementedError, TypeError, AttributeError):
        return None
    ordered = [list(names) for _, names in sorted(groups.items()) if names]
    return list(zip(_labels(ordered), ordered))


def _children_stages(module: nn.Module, expand: tuple[str, ...] = (), prefix: str = "") -> list[tuple[str, list[str]]]:
    """One stage per parameter-owning child (children named in ``expand`` contribute their own
    children instead), in registration order, which is the forward order of these models."""
    stages: list[tuple[str, list[str]]] = []
    direct = [prefix + n for n, _ in module.named_parameters(recurse=False)]
    if direct:
        stages.append((prefix.rstrip(".") or "parameters", direct))
    for name, child in module.named_children():
        if name in expand:
            stages.extend(_children_stages(child, (), prefix + name + "."))
            continue
        names = [f"{prefix}{name}.{n}" for n, _ in child.named_parameters()]
        if names:
            stages.append((prefix + name, names))
    return stages


def _tv_mobilenet_v2_stages(body: nn.Module) -> list[tuple[str, list[str]]]:
    """torchvision MobileNetV2 grouped like timm's ``mobilenetv2_100``: ``features.0`` (stem),
    then consecutive inverted-residual blocks with the same output width (one row of Table 2
    of Sandler et al., CVPR 2018), the final 1x1 convolution joining the last of them."""
    feats = list(body.features.named_children())
    groups: list[list[str]] = [[feats[0][0]]]
    last_width: int | None = None
    for i, (name, block) in enumerate(feats[1:], start=1):
        width = getattr(block, "out_channels", None)
        if i == len(feats) - 1 or (width is not None and width == last_width):
            groups[-1].append(name)
        else:
            groups.append([name])
        last_width = width
    stages = []
    for g in groups:
        label = f"features.{g[0]}" if len(g) == 1 else f"features.{g[0]}-{g[-1]}"
        names = [f"features.{i}.{n}" for i in g for n, _ in body.features.get_submodule(i).named_parameters()]
        if names:
            stages.append((label, names))
    rest = [n for n, _ in body.named_parameters() if not n.startswith("features.")]
    if rest:  # a classifier that was not removed: its own last stage
        stages.append(("classifier", rest))
    return stages


def _body_stages(body: nn.Module) -> list[tuple[str, list[str]]]:
    import torchvision.models as tvm

    from landlens.models.geoembed import GeoEmbedV3
    from landlens.models.base import AlexNetFc7, Pooled

    if isinstance(body, tvm.MobileNetV2):
        return _tv_mobilenet_v2_stages(body)
    if isinstance(body, Pooled):  # SqueezeNet: stem conv, then each Fire module
        return _children_stages(body, expand=("features",))
    if isinstance(body, AlexNetFc7):  # conv1..conv5, fc6, fc7
        return _children_stages(body, expand=("features", "classifier"))
    if isinstance(body, (tvm.GoogLeNet, GeoEmbedV3)):  # stem convs, inception modules / stem, layer1-4, fc
        return _children_stages(body)
    timm_stages = _timm_stages(body)
    if timm_stages is not None:
        return timm_stages
    return _children_stages(body)


def backbone_stages(backbone: nn.Module) -> list[Stage]:
    """The backbone's coarse stages, ordered from the input to the output.

    ``backbone`` is a :class:`~landlens.models.registry.Backbone` (parameter names then start
    with ``body.``) or a bare network. Stages per family:

    - timm models: ``model.group_matcher(coarse=True)`` grouped with
      ``timm.models.group_parameters`` (e.g. ResNet: ``conv1+bn1``, ``layer1``..``layer4``;
      EfficientNet/MobileNet: ``conv_stem+bn1``, ``blocks.0``..``blocks.6+conv_head+bn2``);
      models without a matcher fall back to their parameter-owning children;
    - torchvision MobileNetV2: ``features.0`` and the seven inverted-residual stages, the
      final 1x1 convolution (``features.18``) joining the last, as timm does;
    - SqueezeNet (``Pooled``): every parameter-owning child of ``features`` (stem conv and
      each Fire module);
    - AlexNet (``AlexNetFc7``): ``features.0/3/6/8/10`` (conv1-5), ``classifier.1/4`` (fc6, fc7);
    - GoogLeNet: ``conv1``, ``conv2``, ``conv3`` and each inception module;
    - GeoEmbed v3: ``stem``, ``layer1``..``layer4``, ``fc`` (the embedding projection).

    Every parameter of the backbone is in exactly one stage (checked here; a failure is a bug).
    """
    from landlens.models.registry import Backbone

    body = backbone.body if isinstance(backbone, Backbone) else backbone
    prefix = "body." if isinstance(backbone, Backbone) else ""
    raw = _body_stages(body)
    stages: list[Stage] = []
    seen_labels: set[str] = set()
    for label, names in raw:
        if label in seen_labels:
            label = f"{label}#{len(stages)}"
        seen_labels.add(label)
        stages.append(Stage(label, tuple(prefix + n for n in names)))
    listed = [n for s in stages for n in s.parameters]
    expected = [n for n, _ in backbone.named_parameters()]
    if len(listed) != len(set(listed)) or set(listed) != set(expected):
        missing = sorted(set(expected) - set(listed))[:3]
        raise RuntimeError(f"backbone stages do not partition the parameters (missing {missing}, "
                           f"{len(listed) - len(set(listed))} duplicated)")
    return stages


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class StrategyReport:
    """What :func:`apply_strategy` froze.

    Attributes:
        strategy: ``'linear'``, ``'partial'`` or ``'full'``.
        unfreeze_stages: number of trainable backbone stages.
        stages: all backbone stage names, input to output.
        trainable_stages: the names of the trainable backbone stages.
        trainable_params: number of trainable parameter elements (head included).
        frozen_params: number of frozen parameter elements.
        head_params: number of parameter elements of the head.
    """

    strategy: str
    unfreeze_stages: int
    stages: list[str] = field(default_factory=list)
    trainable_stages: list[str] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0
    head_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "unfreeze_stages": self.unfreeze_stages,
            "num_stages": len(self.stages),
            "stages": list(self.stages),
            "trainable_stages": list(self.trainable_stages),
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "head_params": self.head_params,
        }


def apply_strategy(model: nn.Module, strategy: str, *, unfreeze_stages: int = 1) -> StrategyReport:
    """Set ``requires_grad`` on a classifier's parameters for a transfer strategy.

    Every parameter is first made trainable (so strategies can be re-applied), then
    ``linear`` freezes the whole backbone, ``partial`` freezes all but the last
    ``unfreeze_stages`` stages of :func:`backbone_stages`, and ``full`` freezes nothing.
    The head always trains. After ``model.train()``, call :func:`freeze_batchnorm_eval`.

    Args:
        model: a :class:`~landlens.models.classifier.Classifier` (anything with ``.backbone``
            and ``.head``).
        strategy: ``'linear'``, ``'partial'`` or ``'full'``.
        unfreeze_stages: ``N`` for ``partial`` (1 <= N <= number of stages); ignored otherwise.

    Raises:
        ConfigError: unknown strategy, or ``unfreeze_stages`` out of range for ``partial``.
    """
    key = str(strategy).strip().lower()
    if key not in STRATEGIES:
        raise ConfigError(f"unknown transfer strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    stages = backbone_stages(model.backbone)
    if key == "partial":
        if (isinstance(unfreeze_stages, bool) or not isinstance(unfreeze_stages, numbers.Integral)
                or unfreeze_stages < 1):
            raise ConfigError(f"partial strategy needs unfreeze_stages >= 1, got {unfreeze_stages!r}")
        if unfreeze_stages > len(stages):
            raise ConfigError(f"partial strategy: unfreeze_stages={unfreeze_stages} but backbone "
                              f"{_backbone_name(model)!r} has only {len(stages)} stages")
        n = int(unfreeze_stages)
    else:
        n = 0 if key == "linear" else len(stages)
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.backbone.named_parameters())
    for stage in stages[: len(stages) - n]:
        for name in stage.parameters:
            params[name].requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return StrategyReport(
        strategy=key,
        unfreeze_stages=n,
        stages=[s.name for s in stages],
        trainable_stages=[s.name for s in stages[len(stages) - n:]],
        trainable_params=trainable,
        frozen_params=frozen,
        head_params=sum(p.numel() for p in model.head.parameters()),
    )


def _backbone_name(model: nn.Module) -> str:
    spec = getattr(model.backbone, "spec", None)
    return str(getattr(spec, "name", type(model.backbone).__name__))


def _all_frozen(params: list[nn.Parameter]) -> bool:
    return bool(params) and not any(p.requires_grad for p in params)


def freeze_batchnorm_eval(model: nn.Module) -> list[str]:
    """Put every frozen BatchNorm layer in eval mode; returns the names of those layers.

    In train mode a BatchNorm layer normalises with batch statistics and updates its running
    mean, variance and batch counter even when its affine parameters do not train, so a
    "frozen" backbone would still change. A BatchNorm is frozen when its own parameters are
    all frozen; one without affine parameters follows the nearest enclosing module that has
    parameters. ``nn.Module.train()`` resets every module's mode, so call this after each
    ``model.train()`` (in Lightning: in ``on_train_epoch_start``; Lightning 2.x restores the
    per-module modes after validation by itself).
    """
    modules = dict(model.named_modules())
    names = []
    for name, module in modules.items():
        if not isinstance(module, _BATCHNORM_TYPES):
            continue
        own = list(module.parameters())
        if not own:
            parent = name
            while parent:
                parent = parent.rpartition(".")[0]
                own = list(modules[parent].parameters())
                if own:
                    break
        if _all_frozen(own):
            module.eval()
            names.append(name)
    return names


# --------------------------------------------------------------------------- optimiser groups


def _no_decay_names(module: nn.Module) -> set[str]:
    """Biases, normalisation parameters and other 1-d or scalar parameters (timm's rule)."""
    out = set()
    for mname, m in module.named_modules():
        is_norm = isinstance(m, _NORM_TYPES)
        for pname, p in m.named_parameters(recurse=False):
            if is_norm or pname.endswith("bias") or p.ndim <= 1:
                out.add(f"{mname}.{pname}" if mname else pname)
    return out


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0,
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimiser parameter groups for a classifier; frozen parameters are left out.

    Groups (empty ones dropped), each a dict with ``name``, ``params``, ``lr``, ``weight_decay``:
    ``head`` and ``head_no_decay`` at ``lr``; ``backbone`` and ``backbone_no_decay`` at
    ``lr * backbone_lr_mult``. The ``*_no_decay`` groups hold biases, normalisation layers'
    parameters and other 1-d parameters, with weight decay 0. Parameters outside
    ``model.backbone`` count as head parameters.

    Raises:
        ConfigError: ``lr`` or ``backbone_lr_mult`` not > 0, or ``weight_decay`` < 0.
    """
    lr_f, mult, wd = float(lr), float(backbone_lr_mult), float(weight_decay)
    if not (math.isfinite(lr_f) and lr_f > 0):
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    if not (math.isfinite(mult) and mult > 0):
        raise ConfigError(f"backbone_lr_mult must be > 0 (use the 'linear' strategy to freeze the "
                          f"backbone), got {backbone_lr_mult}")
    if not (math.isfinite(wd) and wd >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay = _no_decay_names(model)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    buckets: dict[str, list[nn.Parameter]] = {"head": [], "head_no_decay": [], "backbone": [],
                                               "backbone_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if id(p) in backbone_ids else "head"
        buckets[part + ("_no_decay" if name in no_decay else "")].append(p)
    settings: dict[str, tuple[float, float]] = {
        "head": (lr_f, wd), "head_no_decay": (lr_f, 0.0),
        "backbone": (lr_f * mult, wd), "backbone_no_decay": (lr_f * mult, 0.0),
    }
    return [{"name": k, "params": v, "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k, v in buckets.items() if v]


__all__ = [
    "STRATEGIES",
    "Stage",
    "StrategyReport",
    "apply_strategy",
    "backbone_stages",
    "freeze_batchnorm_eval",
    "param_groups",
]
