"""One configuration drives a whole training run: divide the dataset, train, evaluate, predict.

A config is a YAML or JSON file with up to six sections (every key optional, defaults below)::

    data:    {path: ../shared/data/UCMerced_LandUse, split: 80/20, seed: 0, augment: dihedral,
              input_size: 224, batch_size: 32}
    model:   {backbone: tf_efficientnet_lite0, weights: auto, strategy: full, head: se}
    loss:    {name: ice}
    optim:   {name: sgd, lr: 0.01, momentum: 0.9, schedule: cosine}
    trainer: {epochs: 10, patience: 3, seed: 0}
    out: runs/train/ucm-full

Any key can be overridden on the command line as ``section.key=value`` (the value is read as
YAML: ``optim.lr=3e-4``, ``trainer.patience=null``). Unknown sections or keys and invalid
values raise :class:`~landlens.errors.ConfigError` naming the key.

Setting ``model.embedding_dim`` makes the run a metric-learning run
(:mod:`landlens.training.metric`): the head is an L2-normalised embedding of that size, the
loss one of :data:`METRIC_LOSSES`, the monitored metric ``val_map`` (retrieval mAP of the
val part against the train part) and the test evaluation a retrieval one::

    model:   {backbone: tf_efficientnet_lite0, weights: package, strategy: linear, embedding_dim: 128}
    loss:    {name: proxy_anchor}           # or arcface, triplet (mining: semihard|hard), ...
    trainer: {epochs: 30, monitor: val_map}
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from landlens.errors import ConfigError, first_line

STRATEGIES = ("linear", "partial", "full")
CLASSIFICATION_LOSSES = ("ce", "nll", "label_smoothing", "ice")
METRIC_LOSSES = ("proxy_anchor", "arcface", "triplet", "multi_similarity", "contrastive")
PROXY_LOSSES = ("proxy_anchor", "arcface")  # losses with learnable class proxies
MINING = ("semihard", "hard", "all", "easy", "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine", "plateau")
PRECISIONS = ("auto", "32", "32-true", "16-mixed", "bf16-mixed")


@dataclass
class DataConfig:
    """Where the images are and how they are divided and fed.

    Attributes:
        path: folder of class sub-folders (or a catalog dataset's root).
        dataset: catalog name (``landlens data list``) for layout and band handling; optional.
        split: ratios (``80/20``, ``70/20/10``, ``70/10/20``...) or the path of a split manifest
            (``landlens data split``). Parts are named train/test or train/val/test.
        seed: seed of the split.
        input_size: network input side; ``None`` keeps the backbone weights' own size.
        resize_mode: ``crop`` (shorter side, then centre crop) or ``squash`` (whole image
            resized; right for small tiles such as EuroSAT's 64 px); ``None`` keeps the weights' rule.
        augment: training augmentation preset (``none``, ``crop-flip``, ``colour``,
            ``geometric``, ``dihedral``).
        batch_size: training batch size (per device).
        eval_batch_size: batch size for validation, test and feature caching.
        num_workers: image-decoding worker processes.
        verify: decode every image of the split before training, so a bad file is reported
            at once (by name) instead of halfway through an epoch.
        cache_features: ``auto`` trains the head on cached frozen features when the backbone is
            frozen and there is no augmentation (mathematically the same run, far faster);
            ``off`` always runs the backbone.
        samples_per_class: metric learning only: class-balanced training batches of ``m``
            images per class (pytorch-metric-learning's ``MPerClassSampler``; ``batch_size``
            must be a multiple of ``m``). ``None``: 4 for the pair and triplet losses
            (``triplet``, ``multi_similarity``, ``contrastive``), plain shuffling for the proxy
            losses; ``0``: plain shuffling.
    """

    path: str = ""
    dataset: str | None = None
    split: str = "80/20"
    seed: int = 0
    input_size: int | None = None
    resize_mode: str | None = None
    augment: str = "none"
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    verify: bool = True
    cache_features: str = "auto"
    samples_per_class: int | None = None


@dataclass
class ModelConfig:
    """Backbone, its starting weights, the transfer strategy and the head.

    Attributes:
        backbone: registry name (``landlens models list``) or a timm name.
        weights: ``auto``, ``package``, ``hub``, ``none`` or a checkpoint path.
        strategy: ``linear`` (backbone frozen), ``partial`` (last ``unfreeze_stages`` stages
            trained) or ``full`` fine-tuning.
        unfreeze_stages: stages trained by ``partial``.
        head: ``linear``, ``mlp`` or ``se``; ``dropout``, ``hidden`` and ``reduction`` set it.
        embedding_dim: set, the run is a metric-learning run: the head is ``Linear`` (+
            ``BatchNorm`` with ``embedding_bn``) to this size, L2-normalised (``head`` and its
            settings are then not used).
        embedding_bn: BatchNorm after the embedding projection.
    """

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "auto"
    strategy: str = "linear"
    unfreeze_stages: int = 1
    head: str = "linear"
    dropout: float = 0.0
    hidden: int = 512
    reduction: int = 16
    embedding_dim: int | None = None
    embedding_bn: bool = False


@dataclass
class LossConfig:
    """The loss of the run.

    Classification: ``ce``, ``nll``, ``label_smoothing`` (``smoothing``) or ``ice`` (``eps``,
    ``ice_weight``). Metric learning (``model.embedding_dim`` set; pytorch-metric-learning,
    see :mod:`landlens.training.metric`): ``proxy_anchor``, ``arcface``, ``triplet``,
    ``multi_similarity`` or ``contrastive``, with

    - ``margin``: Proxy-Anchor's delta (default 0.1), ArcFace's angular margin in degrees
      (28.6), the triplet margin (0.05, also the miner's), the contrastive negative margin
      (1.0), the multi-similarity miner's epsilon (0.1); ``None`` keeps the default;
    - ``scale``: Proxy-Anchor's alpha (32) or ArcFace's scale (64);
    - ``mining``: triplets the triplet loss trains on (``TripletMarginMiner`` type:
      ``semihard``, ``hard``, ``all``, ``easy``; ``none``: every triplet of the batch);
      the multi-similarity loss uses its ``MultiSimilarityMiner`` unless ``none``;
    - ``proxy_lr_mult``: learning rate of the proxy losses' own parameters (class proxies,
      ArcFace's weight matrix) relative to ``optim.lr`` (Kim et al., CVPR 2020: x100).
    """

    name: str = "ce"
    smoothing: float = 0.1
    eps: float = 1e-7
    ice_weight: float = 1.0
    margin: float | None = None
    scale: float | None = None
    mining: str = "semihard"
    proxy_lr_mult: float = 100.0


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``sgd`` (with ``momentum``, Nesterov off), ``adam`` or ``adamw``.
        lr: learning rate of the head (and of the backbone times ``backbone_lr_mult``).
        backbone_lr_mult: backbone learning rate relative to the head's (``partial``/``full``).
        schedule: ``none``, ``step`` (x ``gamma`` every ``step_size`` epochs), ``cosine`` (to 0
            over the run, after ``warmup_epochs`` of linear warm-up) or ``plateau`` (x ``gamma``
            after ``plateau_patience`` epochs without a better validation loss).
    """

    name: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0
    schedule: str = "cosine"
    step_size: int = 5
    gamma: float = 0.1
    plateau_patience: int = 2
    warmup_epochs: int = 0


@dataclass
class TrainerConfig:
    """How Lightning runs the loop.

    Attributes:
        epochs: maximum epochs.
        patience: early stopping after this many epochs without a better ``monitor``; ``None``
            turns early stopping off.
        monitor: ``val_loss`` or ``val_acc`` (``train_loss`` when the split has no validation part);
            a metric-learning run monitors ``val_map`` (retrieval mAP of the val part
            against the train part, cosine) or ``train_loss``.
        precision: ``auto`` (16-bit mixed on CUDA, 32-bit otherwise), ``32``, ``16-mixed``,
            ``bf16-mixed``.
        accelerator, devices, num_nodes, strategy: passed to ``lightning.Trainer``: several
            GPUs or nodes run DDP with the same config.
        seed: seeds Python, NumPy and torch (and the data loader workers).
        deterministic: ask torch for deterministic kernels.
        checkpoint_every_n_steps: also save ``last.ckpt`` every n optimiser steps (resume
            mid-epoch); ``None`` saves at each epoch end only.
        limit_train_batches: fraction or number of training batches per epoch (smoke runs).
        bootstrap: bootstrap replicates for the accuracy confidence interval.
    """

    epochs: int = 10
    patience: int | None = None
    monitor: str = "val_loss"
    precision: str = "auto"
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_n_steps: int | None = None
    limit_train_batches: float = 1.0
    log_every_n_steps: int = 10
    bootstrap: int = 1000


@dataclass
class TrainConfig:
    """A whole run: data, model, loss, optimiser, trainer and the output directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out: str = "runs/train/run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_metric(self) -> bool:
        """A metric-learning run (``model.embedding_dim`` set)."""
        return self.model.embedding_dim is not None

    def validate(self) -> "TrainConfig":
        """Check values that can be checked without touching data or models."""
        from landlens.data.augment import AUGMENT_PRESETS
        from landlens.models.heads import HEAD_KINDS

        d, m, o, t = self.data, self.model, self.optim, self.trainer
        _choice("model.strategy", m.strategy, STRATEGIES)
        _choice("model.head", m.head, HEAD_KINDS)
        _choice("optim.name", o.name, OPTIMIZERS)
        _choice("optim.schedule", o.schedule, SCHEDULES)
        _choice("trainer.precision", str(t.precision), PRECISIONS)
        _choice("trainer.monitor", t.monitor, ("val_loss", "val_acc", "val_map", "train_loss"))
        _choice("data.cache_features", d.cache_features, ("auto", "off"))
        if d.resize_mode is not None:
            _choice("data.resize_mode", d.resize_mode, ("crop", "squash"))
        aug = "colour" if d.augment == "color" else d.augment
        _choice("data.augment", aug, AUGMENT_PRESETS)
        self.data.augment = aug
        self._validate_task()
        if not d.path:
            raise ConfigError("data.path is not set: give the image folder (data.path=FOLDER)")
        for key, value, low in (("data.batch_size", d.batch_size, 1), ("data.eval_batch_size", d.eval_batch_size, 1),
                                ("data.num_workers", d.num_workers, 0), ("trainer.epochs", t.epochs, 1),
                                ("model.unfreeze_stages", m.unfreeze_stages, 1), ("optim.step_size", o.step_size, 1),
                                ("trainer.num_nodes", t.num_nodes, 1), ("trainer.bootstrap", t.bootstrap, 0),
                                ("optim.warmup_epochs", o.warmup_epochs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if d.input_size is not None and (not isinstance(d.input_size, int) or d.input_size < 16):
            raise ConfigError(f"data.input_size must be an integer >= 16 or null, got {d.input_size!r}")
        if t.patience is not None and (not isinstance(t.patience, int) or t.patience < 1):
            raise ConfigError(f"trainer.patience must be a positive integer or null, got {t.patience!r}")
        for key, value in (("optim.lr", o.lr), ("optim.backbone_lr_mult", o.backbone_lr_mult)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        if not 0 <= o.weight_decay:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay!r}")
        if not 0 < o.gamma <= 1:
            raise ConfigError(f"optim.gamma must be in (0, 1], got {o.gamma!r}")
        if o.warmup_epochs >= t.epochs and o.warmup_epochs > 0:
            raise ConfigError(f"optim.warmup_epochs ({o.warmup_epochs}) must be below trainer.epochs ({t.epochs})")
        return self

    def _validate_task(self) -> None:
        """Classification or metric learning: loss, monitor and the metric-learning keys agree."""
        m, lo, t, d = self.model, self.loss, self.trainer, self.data
        if not self.is_metric:
            if lo.name in METRIC_LOSSES:
                raise ConfigError(f"loss.name={lo.name!r} is a metric-learning loss: set model.embedding_dim "
                                  f"(e.g. model.embedding_dim=128) for a metric-learning run")
            _choice("loss.name", lo.name, CLASSIFICATION_LOSSES)
            if t.monitor == "val_map":
                raise ConfigError("trainer.monitor='val_map' is the metric of metric-learning runs "
                                  "(set model.embedding_dim); a classifier monitors val_loss or val_acc")
            return
        dim = m.embedding_dim
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
            raise ConfigError(f"model.embedding_dim must be an integer >= 2 or null, got {dim!r}")
        if lo.name in CLASSIFICATION_LOSSES:
            raise ConfigError(f"loss.name={lo.name!r} is a classification loss; a metric-learning run "
                              f"(model.embedding_dim set) needs one of {', '.join(METRIC_LOSSES)}")
        _choice("loss.name", lo.name, METRIC_LOSSES)
        _choice("loss.mining", lo.mining, MINING)
        if t.monitor not in ("val_map", "train_loss"):
            raise ConfigError(f"trainer.monitor={t.monitor!r} does not apply to a metric-learning run "
                              f"(model.embedding_dim set): use val_map (retrieval mAP of the val part) or train_loss")
        for key, value in (("loss.margin", lo.margin), ("loss.scale", lo.scale)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{key} must be a number or null, got {value!r}")
        if lo.scale is not None and not lo.scale > 0:
            raise ConfigError(f"loss.scale must be > 0, got {lo.scale!r}")
        if isinstance(lo.proxy_lr_mult, bool) or not isinstance(lo.proxy_lr_mult, (int, float)) \
                or not lo.proxy_lr_mult > 0:
            raise ConfigError(f"loss.proxy_lr_mult must be a positive number, got {lo.proxy_lr_mult!r}")
        spc = d.samples_per_class
        if spc is not None and (isinstance(spc, bool) or not isinstance(spc, int) or spc < 0 or spc == 1):
            raise ConfigError(f"data.samples_per_class must be null, 0 (off) or an integer >= 2, got {spc!r}")
        m_ = self.samples_per_class()
        if m_ and d.batch_size % m_:
            raise ConfigError(f"data.batch_size={d.batch_size} must be a multiple of data.samples_per_class={m_} "
                              f"(class-balanced batches of {m_} images per class)")

    def samples_per_class(self) -> int:
        """Images per class in a class-balanced training batch; 0: plain shuffling."""
        if not self.is_metric:
            return 0
        spc = self.data.samples_per_class
        if spc is None:
            return 0 if self.loss.name in PROXY_LOSSES else 4
        return int(spc)


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
             "trainer": TrainerConfig}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Light type coercion so ``1`` is accepted for a float and ``'1e-3'`` for a number."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{key} cannot be null")
    if annotation.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation.startswith("float") and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if annotation.startswith("str") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation.startswith("bool") and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts, refusing unknown keys."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = TrainConfig()
    for section, values in raw.items():
        if section == "out":
            cfg.out = str(values)
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r} "
                              f"(sections: {', '.join([*_SECTIONS, 'out'])})")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        target = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {section}.{key} (keys: {', '.join(fields)})")
            setattr(target, key, _coerce(f"{section}.{key}", value, getattr(target, key), str(fields[key].type)))
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=3e-4'`` -> ``('optim.lr', 0.0003)`` (value read as YAML)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, _, value = text.partition("=")
    key = key.strip()
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and _looks_numeric(parsed):
        parsed = float(parsed)
    return key, parsed


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (a copy is returned)."""
    out = json.loads(json.dumps(raw))
    for text in overrides:
        key, value = parse_override(text)
        if key == "out":
            out["out"] = str(value)
            continue
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise ConfigError(f"override {text!r}: key must be section.key (e.g. optim.lr)")
        sect = out.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"override {text!r}: {section!r} is not a section")
        sect[name] = value
    return out


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON config file into nested dicts."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text()
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {p}: {first_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p} must be a mapping of sections")
    return raw


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file (or start from defaults), apply overrides, and validate."""
    raw = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, str(path) if path is not None else "config").validate()


__all__ = [
    "CLASSIFICATION_LOSSES",
    "DataConfig",
    "LossConfig",
    "METRIC_LOSSES",
    "MINING",
    "ModelConfig",
    "OPTIMIZERS",
    "OptimConfig",
    "PROXY_LOSSES",
    "SCHEDULES",
    "STRATEGIES",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_config_file",
]
