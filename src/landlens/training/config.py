"""One configuration drives a whole training run: divide the dataset, train, evaluate, predict.

A config is a YAML or JSON file with up to six sections (every key optional, defaults below)::

    data:    {path: ../shared/data/UCMerced_LandUse, split: 80/20, seed: 0, augment: dihedral,
              input_size: 224, batch_size: 32}
    model:   {backbone: fusion, weights: auto, strategy: linear, head: linear}
    loss:    {name: ice}
    optim:   {name: sgd, lr: 0.01, momentum: 0.9, schedule: cosine}
    trainer: {epochs: 10, patience: 3, seed: 0}
    out: runs/train/ucm-full

Each section is a pydantic model (:mod:`landlens.config`): every key has a type, choices are
fixed words, and a file's value must have its key's type (``backbone: 100000`` is refused:
quote it). Any key can be overridden on the command line as ``section.key=value``, the text
read by the key's type: text keys keep it verbatim (``model.backbone=1e5`` is the name
``1e5``), other keys read it as YAML (``optim.lr=3e-4`` is 0.0003, ``trainer.patience=null``).
Unknown sections or keys and invalid values raise :class:`~landlens.errors.ConfigError`, one
line naming the key, the value and what the key accepts.

Setting ``model.embedding_dim`` makes the run a metric-learning run
(:mod:`landlens.training.metric`): the head is an L2-normalised embedding of that size, the
loss one of :data:`METRIC_LOSSES`, the monitored metric ``val_map`` (retrieval mAP of the
val part against the train part) and the test evaluation a retrieval one::

    model:   {backbone: tf_efficientnet_lite0, weights: package, strategy: linear, embedding_dim: 128}
    loss:    {name: proxy_anchor}           # or arcface, triplet (mining: semihard|hard), ...
    trainer: {epochs: 30, monitor: val_map}
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args

from pydantic import BeforeValidator, Field, field_validator, model_validator

from landlens.config import RunConfig, Section, int_as_text, read_config_file
from landlens.errors import ConfigError

Strategy = Literal["linear", "partial", "full"]
Head = Literal["linear", "mlp", "se"]  # landlens.models.heads.HEAD_KINDS
Augment = Literal["none", "crop-flip", "colour", "geometric", "dihedral"]  # landlens.training.augment.AUGMENT_PRESETS
ClassificationLoss = Literal["ce", "nll", "label_smoothing", "ice"]
MetricLoss = Literal["proxy_anchor", "arcface", "triplet", "multi_similarity", "contrastive"]
Mining = Literal["semihard", "hard", "all", "easy", "none"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["none", "step", "cosine", "plateau"]
Precision = Annotated[Literal["auto", "32", "32-true", "16-mixed", "bf16-mixed"], BeforeValidator(int_as_text)]
Monitor = Literal["val_loss", "val_acc", "val_map", "train_loss"]
ResizeMode = Literal["crop", "squash"]

STRATEGIES: tuple[str, ...] = get_args(Strategy)
HEADS: tuple[str, ...] = get_args(Head)
AUGMENTS: tuple[str, ...] = get_args(Augment)
CLASSIFICATION_LOSSES: tuple[str, ...] = get_args(ClassificationLoss)
METRIC_LOSSES: tuple[str, ...] = get_args(MetricLoss)
PROXY_LOSSES = ("proxy_anchor", "arcface")  # losses with learnable class proxies
MINING: tuple[str, ...] = get_args(Mining)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
PRECISIONS: tuple[str, ...] = get_args(get_args(Precision)[0])


class DataConfig(Section):
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
    input_size: int | None = Field(None, ge=16)
    resize_mode: ResizeMode | None = None
    augment: Augment = "none"
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    verify: bool = True
    cache_features: Literal["auto", "off"] = "auto"
    samples_per_class: int | None = Field(None, ge=0)

    @field_validator("augment", mode="before")
    @classmethod
    def _colour(cls, value: Any) -> Any:
        return "colour" if value == "color" else value

    @field_validator("samples_per_class")
    @classmethod
    def _not_one(cls, value: int | None) -> int | None:
        if value == 1:
            raise ValueError("expected null, 0 (off) or an integer >= 2")
        return value


class ModelConfig(Section):
    """Backbone, its starting weights, the transfer strategy and the head.

    Attributes:
        backbone: registry name (``landlens models list``), a timm name, or ``fusion[:A+B...]``
            (:mod:`landlens.models.fusion`; the default: EfficientNet-Lite0, MobileNetV2 and
            SqueezeNet 1.1 as one frozen extractor, the best measured frozen representation
            for its cost, benchmarks/results/default_pipeline.md).
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

    backbone: str = "fusion"
    weights: str = "auto"
    strategy: Strategy = "linear"
    unfreeze_stages: int = Field(1, ge=1)
    head: Head = "linear"
    dropout: float = 0.0
    hidden: int = 512
    reduction: int = 16
    embedding_dim: int | None = Field(None, ge=2)
    embedding_bn: bool = False


class LossConfig(Section):
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

    name: ClassificationLoss | MetricLoss = "ce"
    smoothing: float = 0.1
    eps: float = 1e-7
    ice_weight: float = 1.0
    margin: float | None = None
    scale: float | None = Field(None, gt=0)
    mining: Mining = "semihard"
    proxy_lr_mult: float = Field(100.0, gt=0)


class OptimConfig(Section):
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``sgd`` (with ``momentum``, Nesterov off), ``adam`` or ``adamw``.
        lr: learning rate of the head (and of the backbone times ``backbone_lr_mult``); unset, it is
            :data:`LINEAR_LR` for a classifier on a frozen backbone (``strategy: linear``) and
            :data:`DEFAULT_LR` otherwise (UC Merced 70/10/20, linear head on the fused features,
            10 epochs: val accuracy at the last epoch 94.29 % at 0.001, 99.05 % at 0.01 and 0.1, and at 0.03 for 30 epochs;
            benchmarks/results/default_pipeline.md).
        backbone_lr_mult: backbone learning rate relative to the head's (``partial``/``full``).
        schedule: ``none``, ``step`` (x ``gamma`` every ``step_size`` epochs), ``cosine`` (to 0
            over the run, after ``warmup_epochs`` of linear warm-up) or ``plateau`` (x ``gamma``
            after ``plateau_patience`` epochs without a better validation loss).
    """

    name: Optimizer = "adamw"
    lr: float | None = Field(None, gt=0)
    momentum: float = 0.9
    weight_decay: float = Field(1e-4, ge=0)
    backbone_lr_mult: float = Field(1.0, gt=0)
    schedule: Schedule = "cosine"
    step_size: int = Field(5, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    plateau_patience: int = 2
    warmup_epochs: int = Field(0, ge=0)


class TrainerConfig(Section):
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

    epochs: int = Field(10, ge=1)
    patience: int | None = Field(None, ge=1)
    monitor: Monitor = "val_loss"
    precision: Precision = "auto"
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_n_steps: int | None = None
    limit_train_batches: float = 1.0
    log_every_n_steps: int = 10
    bootstrap: int = Field(1000, ge=1)


DEFAULT_LR = 1e-3
"""``optim.lr`` when unset: fine-tuning (``partial``, ``full``) and metric learning."""
LINEAR_LR = 1e-2
"""``optim.lr`` when unset for a classifier on a frozen backbone (``strategy: linear``)."""


class TrainConfig(RunConfig):
    """A whole run: data, model, loss, optimiser, trainer and the output directory."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    out: str = "runs/train/run"

    @model_validator(mode="after")
    def _default_lr(self) -> "TrainConfig":
        if self.optim.lr is None:
            linear = self.model.strategy == "linear" and self.model.embedding_dim is None
            self.optim.lr = LINEAR_LR if linear else DEFAULT_LR
        return self

    @property
    def is_metric(self) -> bool:
        """A metric-learning run (``model.embedding_dim`` set)."""
        return self.model.embedding_dim is not None

    def validate(self) -> "TrainConfig":  # type: ignore[override]
        """Check what spans several keys (each key's type, choices and range are checked on construction)."""
        if not self.data.path:
            raise ConfigError("data.path is not set: give the image folder (data.path=FOLDER)")
        self._validate_task()
        o, t = self.optim, self.trainer
        if o.warmup_epochs >= t.epochs and o.warmup_epochs > 0:
            raise ConfigError(f"optim.warmup_epochs ({o.warmup_epochs}) must be below trainer.epochs ({t.epochs})")
        return self

    def _validate_task(self) -> None:
        """Classification or metric learning: loss, monitor and the metric-learning keys agree."""
        lo, t, d = self.loss, self.trainer, self.data
        if not self.is_metric:
            if lo.name in METRIC_LOSSES:
                raise ConfigError(f"loss.name={lo.name!r} is a metric-learning loss: set model.embedding_dim "
                                  f"(e.g. model.embedding_dim=128) for a metric-learning run")
            if t.monitor == "val_map":
                raise ConfigError("trainer.monitor='val_map' is the metric of metric-learning runs "
                                  "(set model.embedding_dim); a classifier monitors val_loss or val_acc")
            return
        if lo.name in CLASSIFICATION_LOSSES:
            raise ConfigError(f"loss.name={lo.name!r} is a classification loss; a metric-learning run "
                              f"(model.embedding_dim set) needs one of {', '.join(METRIC_LOSSES)}")
        if t.monitor not in ("val_map", "train_loss"):
            raise ConfigError(f"trainer.monitor={t.monitor!r} does not apply to a metric-learning run "
                              f"(model.embedding_dim set): use val_map (retrieval mAP of the val part) or train_loss")
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


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts (a file's, a run's ``config.json``), refusing unknown keys.

    Types, choices and ranges are checked; :meth:`TrainConfig.validate` is not run.
    """
    return TrainConfig.from_dict(raw, source)


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=3e-4'`` -> ``('optim.lr', 0.0003)``: the value read by the key's type and checked."""
    return TrainConfig.parse_override(text)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested dicts (a copy is returned)."""
    return TrainConfig.with_overrides(raw, overrides)


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file (or start from defaults), apply overrides, and validate."""
    return TrainConfig.load(path, overrides)


__all__ = [
    "AUGMENTS",
    "CLASSIFICATION_LOSSES",
    "DataConfig",
    "HEADS",
    "LossConfig",
    "METRIC_LOSSES",
    "MINING",
    "ModelConfig",
    "OPTIMIZERS",
    "OptimConfig",
    "PRECISIONS",
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
