"""Lightning tasks: a scene classifier to hand to any ``lightning.Trainer``, and the base the tasks share.

:class:`ClassificationTask` builds its network from simple arguments, as TorchGeo's
``ClassificationTask`` does: a backbone of the registry with its starting weights, a transfer
strategy (:mod:`landlens.training.strategies`), a head (:mod:`landlens.models.heads`), a loss
(:mod:`landlens.training.losses`), an optimiser and a learning-rate schedule::

    import lightning as L
    from landlens.training import ClassificationTask, SceneDataModule

    task = ClassificationTask(backbone="tf_efficientnet_lite0", weights="package", num_classes=21)
    dm = SceneDataModule.from_folder("UCMerced_LandUse", split="80/20", preprocessing=task.preprocessing)
    L.Trainer(max_epochs=10).fit(task, dm)

It logs ``train_loss``/``train_acc``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc``
per epoch; ``predict_step`` returns class probabilities; ``task.model`` is the trained
:class:`~landlens.models.classifier.Classifier`, which
:func:`~landlens.models.classifier.save_classifier` writes for ``landlens predict``.
``landlens train run`` (:mod:`landlens.training.engine`) trains this same class, and the
metric-learning task (:class:`~landlens.training.metric.MetricTask`) shares its base,
:class:`TrainingTask`.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import nn

from landlens.errors import ConfigError, first_line
from landlens.models.classifier import Classifier, Embedder, EmbeddingConfig, HeadConfig
from landlens.training.config import OptimConfig, TrainConfig
from landlens.training.runs import RNGStateCheckpoint, log_loss_and_accuracy, monitor_mode


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def head_param_groups(net: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups of a network trained as a whole at one learning rate (no decay on biases/norms)."""
    decay, plain = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (plain if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "head"},
              {"params": plain, "lr": lr, "weight_decay": 0.0, "name": "head_no_decay"}]
    return [g for g in groups if g["params"]]


def build_network(backbone: str, weights: str, classes: Sequence[str], *, head: HeadConfig | None = None,
                  embedding: EmbeddingConfig | None = None, input_size: int | None = None,
                  resize_mode: str | None = None) -> Classifier | Embedder:
    """A classifier (or, with ``embedding``, a metric-learning embedder) on a registry backbone.

    The backbone starts from ``weights`` (``create_backbone``); ``input_size`` and
    ``resize_mode`` replace those of the weights' preprocessing when given.
    """
    from landlens.models.registry import create_backbone

    bb = create_backbone(backbone, weights)
    model: Classifier | Embedder
    if embedding is not None:
        model = Embedder(bb, list(classes), embedding)
    else:
        model = Classifier(bb, list(classes), head or HeadConfig())
    changes: dict[str, Any] = {}
    if input_size is not None:
        changes["input_size"] = int(input_size)
    if resize_mode is not None:
        changes["resize_mode"] = resize_mode
    if changes:
        model.backbone.preprocessing = model.backbone.preprocessing.replace(**changes)
    return model


class TrainingTask(RNGStateCheckpoint, L.LightningModule):
    """What the landlens tasks share: a network, its loss, an optimiser and schedule, frozen parts kept frozen.

    The RNG state travels in every checkpoint (:class:`~landlens.training.runs.RNGStateCheckpoint`).

    Args:
        net: the network being trained.
        loss: maps (network output, targets) to a scalar.
        optim: optimiser and schedule settings.
        epochs: the cosine schedule's horizon; ``None``: the Trainer's ``max_epochs``.
        param_groups: optimiser parameter groups; default: :meth:`default_param_groups`.
        monitor: metric the plateau schedule watches.
    """

    def __init__(self, net: nn.Module, loss: nn.Module, optim: OptimConfig, epochs: int | None = None, *,
                 param_groups: list[dict[str, Any]] | None = None, monitor: str = "val_loss") -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss
        self.optim_cfg = optim
        self.epochs = None if epochs is None else int(epochs)
        self._groups = param_groups
        self.monitor = monitor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        from landlens.training.strategies import freeze_batchnorm_eval

        freeze_batchnorm_eval(self.net)
        backbone = getattr(self.net, "backbone", None)
        if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
            backbone.eval()  # a frozen backbone is a fixed feature extractor: no dropout, no BN updates

    def default_param_groups(self) -> list[dict[str, Any]]:
        """Every trainable parameter of ``net`` at ``optim.lr`` (no weight decay on biases and norms)."""
        return head_param_groups(self.net, self.optim_cfg.lr, self.optim_cfg.weight_decay)

    def _horizon(self) -> int:
        if self.epochs is not None:
            return self.epochs
        n = self._trainer.max_epochs if self._trainer is not None else None
        if n is None or n < 1:
            raise ConfigError("the cosine schedule needs the run's length: give epochs= to the task, or a Trainer "
                              "with max_epochs")
        return int(n)

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        o = self.optim_cfg
        groups = self._groups if self._groups is not None else self.default_param_groups()
        if not groups:
            raise RuntimeError("nothing to train: every parameter is frozen")
        if o.name == "sgd":
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        elif o.name == "adam":
            opt = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        if o.schedule == "none":
            return opt
        if o.schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
        elif o.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=monitor_mode(self.monitor),
                                                               factor=o.gamma, patience=o.plateau_patience)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor,
                                                       "interval": "epoch", "strict": False}}
        else:
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self._horizon() - o.warmup_epochs))
            if o.warmup_epochs > 0:
                warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=o.warmup_epochs)
                sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[o.warmup_epochs])
            else:
                sched = cos
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _class_names(num_classes: int | None, classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        names = [str(c) for c in classes]
        if num_classes is not None and int(num_classes) != len(names):
            raise ConfigError(f"num_classes={num_classes} but {len(names)} class names were given")
        return names
    if num_classes is None:
        raise ConfigError("give num_classes= (or classes=, the class names in label order)")
    return [str(i) for i in range(int(num_classes))]


def _optim(**values: Any) -> OptimConfig:
    from pydantic import ValidationError

    try:
        return OptimConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err.get("loc", ())) or "optimiser"
        key = {"name": "optimizer"}.get(key, key)
        raise ConfigError(f"{key}={err.get('input')!r}: {first_line(err.get('msg', exc))}") from None


class ClassificationTask(TrainingTask):
    """A scene classifier built from simple arguments, trained by any Lightning ``Trainer``.

    The network is a :class:`~landlens.models.classifier.Classifier`: the backbone's pooled
    features, then a head with log-softmax. The steps log ``{train,val,test}_loss`` and
    ``{train,val,test}_acc`` per epoch; ``predict_step`` returns probabilities.

    Args:
        backbone: registry name (``landlens models list``) or a timm name.
        weights: the backbone's starting weights: ``auto``, ``package``, ``hub``, ``none``
            (random initialisation) or a checkpoint path.
        num_classes: number of classes (their names are then ``'0'``, ``'1'``...).
        classes: the class names in label order (instead of, or agreeing with, ``num_classes``).
        strategy: ``linear`` (backbone frozen), ``partial`` (the last ``unfreeze_stages``
            stages train) or ``full``.
        head: ``linear``, ``mlp`` or ``se``, with ``dropout``, ``hidden``, ``reduction``.
        input_size, resize_mode: replace the preprocessing of the weights (see :attr:`preprocessing`).
        loss: ``ce``, ``nll``, ``label_smoothing`` (``smoothing``) or ``ice`` (``eps``,
            ``ice_weight``).
        optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``; ``lr`` is the head's
            learning rate, the backbone's is ``lr * backbone_lr_mult``; ``weight_decay``.
        schedule: ``none``, ``step`` (x ``gamma`` every ``step_size`` epochs), ``cosine``
            (after ``warmup_epochs`` of linear warm-up) or ``plateau`` (x ``gamma`` after
            ``plateau_patience`` epochs without a better ``monitor``).
        epochs: horizon of the cosine schedule; ``None``: the Trainer's ``max_epochs``.
        monitor: the metric the plateau schedule watches.

    Raises:
        ConfigError: an unknown backbone, strategy, head, loss, optimiser or schedule, or a
            value out of range.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str = "auto", num_classes: int | None = None,
                 *, classes: Sequence[str] | None = None, strategy: str = "linear", unfreeze_stages: int = 1,
                 head: str = "linear", dropout: float = 0.0, hidden: int = 512, reduction: int = 16,
                 input_size: int | None = None, resize_mode: str | None = None, loss: str = "ce",
                 smoothing: float = 0.1, eps: float = 1e-7, ice_weight: float = 1.0, optimizer: str = "adamw",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 1e-4, backbone_lr_mult: float = 1.0,
                 schedule: str = "cosine", step_size: int = 5, gamma: float = 0.1, plateau_patience: int = 2,
                 warmup_epochs: int = 0, epochs: int | None = None, monitor: str = "val_loss") -> None:
        from landlens.training.losses import build_loss
        from landlens.training.strategies import apply_strategy

        names = _class_names(num_classes, classes)
        optim = _optim(name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       backbone_lr_mult=backbone_lr_mult, schedule=schedule, step_size=step_size, gamma=gamma,
                       plateau_patience=plateau_patience, warmup_epochs=warmup_epochs)
        loss_fn = build_loss(loss, smoothing=smoothing, eps=eps, ice_weight=ice_weight)
        model = build_network(backbone, weights, names, head=HeadConfig(head, dropout, hidden, reduction),
                              input_size=input_size, resize_mode=resize_mode)
        report = apply_strategy(model, strategy, unfreeze_stages=unfreeze_stages)
        super().__init__(model, loss_fn, optim, epochs, monitor=monitor)
        self.save_hyperparameters()
        # the whole classifier, also when only its head trains (use_cached_features): kept out of the
        # module tree so that checkpoints hold what trains, once
        object.__setattr__(self, "_classifier", model)
        self.strategy_report = report
        self.train()  # registry backbones come in eval mode, and Lightning trains modules in the mode it finds them

    @classmethod
    def from_config(cls, cfg: TrainConfig, classes: Sequence[str], *, monitor: str | None = None
                    ) -> "ClassificationTask":
        """The task of a classification run config (``landlens train run``) for ``classes``."""
        m, lo, o = cfg.model, cfg.loss, cfg.optim
        return cls(m.backbone, m.weights, classes=classes, strategy=m.strategy, unfreeze_stages=m.unfreeze_stages,
                   head=m.head, dropout=m.dropout, hidden=m.hidden, reduction=m.reduction,
                   input_size=cfg.data.input_size, resize_mode=cfg.data.resize_mode, loss=lo.name,
                   smoothing=lo.smoothing, eps=lo.eps, ice_weight=lo.ice_weight, optimizer=o.name, lr=o.lr,
                   momentum=o.momentum, weight_decay=o.weight_decay, backbone_lr_mult=o.backbone_lr_mult,
                   schedule=o.schedule, step_size=o.step_size, gamma=o.gamma, plateau_patience=o.plateau_patience,
                   warmup_epochs=o.warmup_epochs, epochs=cfg.trainer.epochs, monitor=monitor or cfg.trainer.monitor)

    @property
    def model(self) -> Classifier:
        """The whole classifier (backbone and head), whichever part of it trains."""
        return self._classifier  # type: ignore[no-any-return]

    @property
    def preprocessing(self) -> Any:
        """What the network expects of an image (input size, resizing, normalisation): give it to the data."""
        return self.model.backbone.preprocessing

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    def use_cached_features(self) -> "ClassificationTask":
        """Train the head alone, on pooled features of the frozen backbone instead of images.

        With a frozen backbone and no augmentation this is the same computation as training on
        images, far faster: the features are computed once
        (:func:`~landlens.features.cache.cached_features`,
        :class:`~landlens.training.datamodule.FeatureDataModule`). Checkpoints then hold the head.

        Raises:
            ConfigError: some backbone parameter trains.
        """
        if any(p.requires_grad for p in self.model.backbone.parameters()):
            raise ConfigError("only a frozen backbone (strategy='linear') can be replaced by cached features")
        self.net = self.model.head
        return self

    def default_param_groups(self) -> list[dict[str, Any]]:
        """The head at ``lr``, the trainable backbone at ``lr * backbone_lr_mult``; no decay on biases and norms."""
        if self.net is not self.model:
            return super().default_param_groups()
        from landlens.training.strategies import param_groups

        o = self.optim_cfg
        return param_groups(self.model, o.lr, backbone_lr_mult=o.backbone_lr_mult, weight_decay=o.weight_decay)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logp = self.net(x)
        loss = self.loss_fn(logp.float(), y)
        log_loss_and_accuracy(self, stage, loss, logp, y)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):  # noqa: D102
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x).float().exp()


__all__ = ["ClassificationTask", "TrainingTask", "build_network", "head_param_groups"]
