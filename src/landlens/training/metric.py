"""Deep metric learning on the training engine: an L2-normalised embedding trained for retrieval.

A metric-learning run (``model.embedding_dim`` set in the :class:`~landlens.training.config.TrainConfig`)
trains an :class:`~landlens.models.classifier.Embedder` (backbone + ``Linear`` (+ ``BatchNorm``)
+ L2 normalisation) with a loss of pytorch-metric-learning (PML; Musgrave, Belongie & Lim, "A
Metric Learning Reality Check", ECCV 2020), on the same Lightning engine, strategies
(``linear`` / ``partial`` / ``full``), checkpoints and frozen-feature fast path as classification:

- ``proxy_anchor``: Proxy-Anchor loss (Kim, Kim, Cho & Kwak, "Proxy Anchor Loss for Deep Metric
  Learning", CVPR 2020, Eq. 4), one learnable proxy per class, margin delta and scale alpha;
- ``arcface``: additive angular margin (Deng, Guo, Xue & Zafeiriou, "ArcFace", CVPR 2019, Eq. 3),
  a learnable class-weight matrix; margin in degrees;
- ``triplet``: triplet margin loss (Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015,
  Eq. 1) on the triplets that ``TripletMarginMiner`` selects (``semihard``: negatives farther
  than the positive but within the margin, FaceNet Sec. 3.2; ``hard``: negatives closer than
  the positive);
- ``multi_similarity``: multi-similarity loss with its pair miner (Wang, Han, Huang, Dong &
  Scott, "Multi-Similarity Loss with General Pair Weighting", CVPR 2019, Eq. 12 and Sec. 4.1);
- ``contrastive``: contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006, Eq. 4) on every pair
  of the batch.

Proxy losses have parameters of their own; they get their own optimiser parameter group at
``optim.lr * loss.proxy_lr_mult`` (no weight decay), as PML's documentation and the
Proxy-Anchor paper (proxies at 100x the network's learning rate) recommend. Pair and triplet
losses draw class-balanced batches (``data.samples_per_class`` images per class,
:class:`~landlens.training.datamodule.ClassBalancedSampler`).

Validation (the monitored ``val_map``): every image of the val part queries the train part
(cosine similarity; no test image involved). At the end the test part is evaluated once with
the ``split`` protocol of :mod:`landlens.retrieval.protocols`: test queries, database the whole
archive (every image of the split) minus the query; relevance is the class label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from landlens.errors import ConfigError
from landlens.training.config import METRIC_LOSSES, MINING, PROXY_LOSSES, LossConfig, OptimConfig
from landlens.training.task import TrainingTask

if TYPE_CHECKING:
    from landlens.retrieval.evaluate import EvaluationResult
    from landlens.retrieval.metrics import RetrievalScores

#: Defaults of ``loss.margin`` / ``loss.scale`` per loss (PML's own defaults).
LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "proxy_anchor": {"margin": 0.1, "scale": 32.0},
    "arcface": {"margin": 28.6, "scale": 64.0},
    "triplet": {"margin": 0.05},
    "multi_similarity": {"margin": 0.1},  # the miner's epsilon
    "contrastive": {"margin": 1.0},  # the negative margin
}


class MetricLoss(nn.Module):
    """A PML loss and, optionally, its miner: ``forward(embeddings, labels)`` -> scalar.

    Attributes:
        name: the landlens loss name.
        loss: the PML loss module (its parameters, if any, are the proxies).
        miner: the PML miner, or ``None``.
        settings: the values used (for results.json).
    """

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None, settings: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.miner = miner
        self.settings = dict(settings)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                             f"and {tuple(labels.shape)}")
        if self.miner is not None:
            return self.loss(embeddings, labels, self.miner(embeddings, labels))
        return self.loss(embeddings, labels)

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.parameters())

    def param_groups(self, lr: float, lr_mult: float) -> list[dict[str, Any]]:
        """The optimiser group of the loss's own parameters (proxies), or ``[]``."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        return [{"name": "loss_proxies", "params": params, "lr": float(lr) * float(lr_mult), "weight_decay": 0.0}]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "pml_loss": type(self.loss).__name__,
                "miner": type(self.miner).__name__ if self.miner is not None else None, **self.settings}


def build_metric_loss(name: str, num_classes: int, embedding_dim: int, *, margin: float | None = None,
                      scale: float | None = None, mining: str = "semihard") -> MetricLoss:
    """The metric-learning loss ``name`` (see the module docstring) for ``num_classes`` classes.

    Args:
        name: one of :data:`~landlens.training.config.METRIC_LOSSES`.
        num_classes: classes of the training part (proxy losses: one proxy per class).
        embedding_dim: length of the embeddings.
        margin, scale: see :class:`~landlens.training.config.LossConfig`; ``None``: defaults
            of :data:`LOSS_DEFAULTS`.
        mining: ``semihard``, ``hard``, ``all``, ``easy`` (triplet miner type) or ``none``.

    Raises:
        ConfigError: unknown loss or mining, or a bad margin / scale.
    """
    from pytorch_metric_learning import losses, miners

    key = str(name).strip().lower().replace("-", "_")
    if key not in METRIC_LOSSES:
        raise ConfigError(f"unknown metric-learning loss {name!r}; choose one of {', '.join(METRIC_LOSSES)}")
    if mining not in MINING:
        raise ConfigError(f"loss.mining={mining!r} is not one of {', '.join(MINING)}")
    if num_classes < 2:
        raise ConfigError(f"metric learning needs at least 2 classes in the train part, got {num_classes}")
    d = LOSS_DEFAULTS[key]
    mg = float(d["margin"] if margin is None else margin)
    sc = float(d.get("scale", 0.0) if scale is None else scale)
    settings: dict[str, Any] = {"margin": mg}
    miner: nn.Module | None = None
    if key == "proxy_anchor":
        if not mg >= 0 or not sc > 0:
            raise ConfigError(f"proxy_anchor needs margin >= 0 and scale > 0, got {mg}, {sc}")
        loss: nn.Module = losses.ProxyAnchorLoss(num_classes, embedding_dim, margin=mg, alpha=sc)
        settings["scale"] = sc
    elif key == "arcface":
        if not 0 <= mg < 90 or not sc > 0:
            raise ConfigError(f"arcface needs a margin in [0, 90) degrees and scale > 0, got {mg}, {sc}")
        loss = losses.ArcFaceLoss(num_classes, embedding_dim, margin=mg, scale=sc)
        settings["scale"] = sc
    elif key == "triplet":
        if not mg > 0:
            raise ConfigError(f"triplet needs margin > 0, got {mg}")
        loss = losses.TripletMarginLoss(margin=mg)
        if mining != "none":
            miner = miners.TripletMarginMiner(margin=mg, type_of_triplets=mining)
        settings["mining"] = mining
    elif key == "multi_similarity":
        if not mg >= 0:
            raise ConfigError(f"multi_similarity miner epsilon (loss.margin) must be >= 0, got {mg}")
        loss = losses.MultiSimilarityLoss()
        if mining != "none":
            miner = miners.MultiSimilarityMiner(epsilon=mg)
        settings["mining"] = "multi_similarity" if miner is not None else "none"
    else:
        if not mg > 0:
            raise ConfigError(f"contrastive needs a negative margin > 0, got {mg}")
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=mg)
    return MetricLoss(key, loss, miner, settings)


def metric_loss_from_config(cfg: LossConfig, num_classes: int, embedding_dim: int) -> MetricLoss:
    """:func:`build_metric_loss` with the settings of a config's ``loss`` section."""
    return build_metric_loss(cfg.name, num_classes, embedding_dim, margin=cfg.margin, scale=cfg.scale,
                             mining=cfg.mining)


def is_proxy_loss(name: str) -> bool:
    return name in PROXY_LOSSES


# --------------------------------------------------------------------------- embedding and scoring


def _split_net(net: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(backbone or None, head): an Embedder, or a bare head on cached features."""
    backbone = getattr(net, "backbone", None)
    head = getattr(net, "head", None)
    if backbone is not None and head is not None:
        return backbone, head
    return None, net


@torch.inference_mode()
def embed_loader(net: nn.Module, loader: Any, device: torch.device | str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``net`` in eval mode over ``loader``: (backbone features, embeddings, labels) as float32 arrays.

    ``net`` is an :class:`~landlens.models.classifier.Embedder` (images in) or an embedding head
    (cached features in: the features are then the inputs). The caller restores train mode.
    """
    backbone, head = _split_net(net)
    dev = torch.device(device) if device is not None else next(
        (p.device for p in net.parameters()), torch.device("cpu"))
    was = net.training
    net.eval()
    feats, embs, ys = [], [], []
    try:
        for x, y in loader:
            x = x.to(dev)
            f = backbone(x) if backbone is not None else x
            e = head(f)
            feats.append(f.float().flatten(1).cpu())
            embs.append(e.float().cpu())
            ys.append(torch.as_tensor(y).cpu())
    finally:
        net.train(was)
    return (torch.cat(feats).numpy(), torch.cat(embs).numpy(), torch.cat(ys).numpy().astype(np.int64))


def part_map(x: np.ndarray, labels: np.ndarray, query_rows: np.ndarray, database_rows: np.ndarray,
             classes: Sequence[str] = ()) -> RetrievalScores:
    """Retrieval scores (cosine) of ``x[query_rows]`` against ``x[database_rows]`` (disjoint rows)."""
    from landlens.retrieval.metrics import evaluate_retrieval

    return evaluate_retrieval(x[query_rows], labels[query_rows], x[database_rows], labels[database_rows],
                              metric="cosine", classes=list(classes), warn=False)


@dataclass
class RetrievalReport:
    """Retrieval of one embedding of the split: val part against train part, test with the split protocol.

    Attributes:
        val: scores of val queries against the train part (``None`` without a val part).
        test: the ``split`` protocol evaluation (test queries, archive-minus-query database).
    """

    val: RetrievalScores | None
    test: EvaluationResult

    def val_metrics(self) -> dict[str, float] | None:
        return _floats(self.val.summary()) if self.val is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"val": ({"protocol": "val part queries the train part (cosine)", "metrics": self.val_metrics(),
                         "queries": self.val.n_queries} if self.val is not None else None),
                "test": self.test.to_dict()}


def _floats(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v != v else float(v)) for k, v in d.items()}


def evaluate_split(x: np.ndarray, rows: np.ndarray, data: Any, name: str) -> RetrievalReport:
    """Score features ``x`` of the split's images (dataset positions ``rows``, ascending).

    ``data`` is a :class:`~landlens.training.datamodule.PreparedData`; ``name`` labels the
    features in the report (e.g. ``'run:NAME'``).
    """
    from landlens.features.store import FeatureSet
    from landlens.retrieval.evaluate import evaluate

    ds = data.dataset
    labels = np.asarray(ds.labels, dtype=np.int64)[rows]
    fs = FeatureSet(np.ascontiguousarray(x, dtype=np.float32), [ds.paths[int(r)] for r in rows], labels,
                    list(ds.classes), {"dataset": {"name": ds.name, "root": str(ds.root)},
                                       "identity": {"backbone": name}}, np.ones(len(rows), bool))
    test = evaluate(fs, distance="cosine", protocol="split", manifest=data.split, database="archive-minus-query")
    val = None
    if data.val_part is not None:
        pos = {int(r): i for i, r in enumerate(rows)}
        q = np.array([pos[int(r)] for r in data.parts["val"]], dtype=np.int64)
        db = np.array([pos[int(r)] for r in data.parts["train"]], dtype=np.int64)
        val = part_map(fs.features, labels, q, db, ds.classes)
    return RetrievalReport(val, test)


# --------------------------------------------------------------------------- the Lightning task


class MetricTask(TrainingTask):
    """Train ``net`` (L2-normalised embeddings out) with a :class:`MetricLoss`.

    Logs ``train_loss`` per epoch and, when the data module has a val part, ``val_map``: the
    mAP of the val images querying the train part (the data module's
    ``database_dataloader()``, embedded without augmentation), cosine similarity.

    Args:
        net: an :class:`~landlens.models.classifier.Embedder`, or its head on cached features.
        loss: the metric loss (its parameters, if any, train too and are checkpointed).
        optim, epochs, param_groups, monitor: as for :class:`~landlens.training.task.TrainingTask`.

    ``test_step`` collects ``(embeddings, labels)`` of the test batches in ``test_outputs``.
    """

    def __init__(self, net: nn.Module, loss: MetricLoss, optim: OptimConfig, epochs: int | None = None, *,
                 param_groups: list[dict[str, Any]] | None = None, monitor: str = "val_map") -> None:
        super().__init__(net, loss, optim, epochs, param_groups=param_groups, monitor=monitor)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):  # noqa: D102 - Lightning hook
        x, y = batch
        emb = self.net(x)
        loss = self.loss_fn(emb.float(), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):  # noqa: D102
        x, y = batch
        self._val.append((self.net(x).float().cpu(), y.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val or self.trainer.sanity_checking:
            return
        q = torch.cat([e for e, _ in self._val]).numpy()
        ql = torch.cat([y for _, y in self._val]).numpy().astype(np.int64)
        self._val = []
        _, db, dbl = embed_loader(self.net, self.trainer.datamodule.database_dataloader(), self.device)
        x = np.concatenate([q, db])
        labels = np.concatenate([ql, dbl])
        scores = part_map(x, labels, np.arange(len(q)), np.arange(len(q), len(x)))
        self.log("val_map", float(scores.map), prog_bar=True, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []

    def test_step(self, batch, batch_idx):  # noqa: D102
        x, y = batch
        self.test_outputs.append((self.net(x).float().cpu(), y.cpu()))

    def predict_step(self, batch, batch_idx):  # noqa: D102
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x).float()


__all__ = [
    "LOSS_DEFAULTS",
    "MetricLoss",
    "MetricTask",
    "RetrievalReport",
    "build_metric_loss",
    "embed_loader",
    "evaluate_split",
    "is_proxy_loss",
    "metric_loss_from_config",
    "part_map",
]
