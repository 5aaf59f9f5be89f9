"""The Lightning task: one network that outputs log-probabilities, a loss, an optimiser, a schedule.

The network is either a whole :class:`~landlens.models.classifier.Classifier` (images in) or only
its head (cached features in, see :mod:`landlens.training.datamodule`); the task does not care.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from landlens.training.config import OptimConfig
from landlens.training.runs import RNGStateCheckpoint, monitor_mode

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


class ClassificationTask(RNGStateCheckpoint, L.LightningModule):
    """Train ``net`` (log-probabilities out) with ``loss``; logs loss and accuracy per epoch.

    Args:
        net: the network being trained (a classifier, or a head on cached features).
        loss: maps (log-probabilities, targets) to a scalar.
        optim: optimiser and schedule settings.
        epochs: length of the run (the cosine schedule's horizon).
        param_groups: optimiser parameter groups; default: every trainable parameter at ``optim.lr``.
        monitor: metric the plateau schedule watches.
    """

    def __init__(self, net: nn.Module, loss: nn.Module, optim: OptimConfig, epochs: int, *,
                 param_groups: list[dict[str, Any]] | None = None, monitor: str = "val_loss") -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss
        self.optim_cfg = optim
        self.epochs = int(epochs)
        self._groups = param_groups
        self.monitor = monitor
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        from landlens.training.strategies import freeze_batchnorm_eval

        freeze_batchnorm_eval(self.net)
        backbone = getattr(self.net, "backbone", None)
        if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
            backbone.eval()  # a frozen backbone is a fixed feature extractor: no dropout, no BN updates

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logp = self.net(x)
        loss = self.loss_fn(logp.float(), y)
        acc = (logp.argmax(1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []

    def test_step(self, batch, batch_idx):  # noqa: D102
        x, y = batch
        logp = self.net(x).float()
        self.test_outputs.append((logp.exp().cpu(), y.cpu()))

    def predict_step(self, batch, batch_idx):  # noqa: D102
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x).float().exp()

    # ------------------------------------------------------------------ optimiser and schedule
    def configure_optimizers(self):  # noqa: D102
        o = self.optim_cfg
        groups = self._groups if self._groups is not None else head_param_groups(self.net, o.lr, o.weight_decay)
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
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs - o.warmup_epochs))
            if o.warmup_epochs > 0:
                warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=o.warmup_epochs)
                sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[o.warmup_epochs])
            else:
                sched = cos
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}



__all__ = ["ClassificationTask", "head_param_groups"]
