"""The Lightning tasks of matching runs: the autoencoder (reconstruction) and the pair discriminator.

Both optimise as the paper does (SGD or Adam, the rate multiplied by ``optim.plateau_factor``
when the monitored loss stops improving) and carry the RNG state in their checkpoints
(:class:`~landlens.training.runs.RNGStateCheckpoint`); :func:`landlens.training.runs.fit` runs them.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landlens.matching.config import MatchingConfig
from landlens.matching.data import PairFeatures
from landlens.matching.networks import MatchingDiscriminator, ResidualAutoencoder, reconstruction_loss
from landlens.models.tta import dihedral
from landlens.training.runs import RNGStateCheckpoint, log_loss_and_accuracy


class _MatchingTask(RNGStateCheckpoint, L.LightningModule):
    """Optimiser (SGD or Adam), ``ReduceLROnPlateau`` on the monitored loss, RNG state in checkpoints."""

    def __init__(self, net: nn.Module, cfg: MatchingConfig, monitor: str) -> None:
        super().__init__()
        self.net = net
        self.optim_cfg = cfg.optim
        self.monitor = monitor

    def configure_optimizers(self):  # noqa: D102 - Lightning hook
        o = self.optim_cfg
        params = [p for p in self.net.parameters() if p.requires_grad]
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=o.plateau_factor,
                                                           patience=o.plateau_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "interval": "epoch",
                                                   "strict": False}}


class AETask(_MatchingTask):
    """Autoencoder training: mean squared reconstruction error; unreadable images are skipped and listed."""

    def __init__(self, ae: ResidualAutoencoder, cfg: MatchingConfig, monitor: str) -> None:
        super().__init__(ae, cfg, monitor)
        self.unreadable: dict[str, str] = {}

    def _step(self, batch: tuple[torch.Tensor | None, list[tuple[str, str]]], stage: str) -> torch.Tensor | None:
        x, bad = batch
        for path, reason in bad:
            self.unreadable[str(path)] = str(reason)
        if x is None:
            return None
        recon, _ = self.net(x)
        loss = reconstruction_loss(recon.float(), x)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")


class DMLTask(_MatchingTask):
    """Discriminator training: 2-way cross-entropy on (first, second, match) batches; pair accuracy.
    With ``pairs.augment = dihedral`` each training map is turned by its own random element of D4."""

    def __init__(self, net: MatchingDiscriminator, cfg: MatchingConfig, monitor: str) -> None:
        super().__init__(net, cfg, monitor)
        self.augment = cfg.pairs.augment

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        a, b, y = batch
        logits = self.net(a, b).float()
        loss = F.cross_entropy(logits, y)
        log_loss_and_accuracy(self, stage, loss, logits, y)
        return loss

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        if self.augment == "dihedral":
            a, b, y = batch
            shape = self.net.config.features_shape
            batch = (random_dihedral(a.reshape(-1, *shape)), random_dihedral(b.reshape(-1, *shape)), y)
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: D102
        self._step(batch, "val")


def random_dihedral(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``(B, C, H, W)`` turned by its own uniformly random element of D4 (1x1 maps unchanged)."""
    if maps.shape[-1] == 1 and maps.shape[-2] == 1:
        return maps
    g = torch.randint(8, (maps.shape[0],), device=maps.device)
    out = torch.empty_like(maps)
    for k in range(8):
        pick = g == k
        if bool(pick.any()):
            out[pick] = dihedral(maps[pick], k)
    return out


@torch.inference_mode()
def pair_scores(model: MatchingDiscriminator, features: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                batch: int = 1024) -> dict[str, float]:
    """Cross-entropy and accuracy of ``model`` on labelled pairs (eval mode); ``{'loss', 'accuracy', 'pairs'}``."""
    model.eval()
    ds = PairFeatures(features)
    a, b, y = pairs
    total_loss, correct = 0.0, 0
    for s in range(0, len(y), batch):
        xa, xb, yy = ds.__getitems__(list(zip(a[s:s + batch], b[s:s + batch], y[s:s + batch])))
        logits = model(xa, xb).float()
        total_loss += float(F.cross_entropy(logits, yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
    n = int(len(y))
    return {"loss": total_loss / n if n else float("nan"), "accuracy": correct / n if n else float("nan"), "pairs": n}


__all__ = ["AETask", "DMLTask", "pair_scores", "random_dihedral"]
