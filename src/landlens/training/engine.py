"""Train, evaluate and save a scene classifier from one :class:`~landlens.training.config.TrainConfig`.

:func:`train` runs the study's three steps in one go: ``divide_dataset`` (the split, saved as
``split.json``), ``train`` (a :class:`~landlens.training.task.ClassificationTask` fitted by
:func:`landlens.training.runs.fit`: checkpoints, early stopping, schedules, DDP and mixed
precision where the hardware has them) and the test evaluation. A run directory holds::

    config.json            the resolved config (a resume must match it)
    split.json             the split manifest actually used
    checkpoints/last.ckpt  resume point (tensors and plain values only: loaded with weights_only)
    checkpoints/best.ckpt  best epoch by the monitored metric (when there is a validation part)
    history.csv/.json      per-epoch loss, accuracy, learning rate and time
    model.safetensors/.json  the trained classifier (``landlens predict`` / ``export`` read these)
    results.json           command, versions, data, strategy, timings and test metrics
    report.md              test accuracy with its bootstrap interval, per-class precision/recall/F1
    test_predictions.csv   every test image with its true and predicted class and probability
    confusion_matrix.png, learning_curves.png

A metric-learning run (``model.embedding_dim`` set; :mod:`landlens.training.metric`) goes through
the same steps and files, except that the model is an embedder (usable as
``--backbone run:DIR``), the monitored metric is ``val_map``, and ``results.json`` /
``report.md`` hold retrieval metrics: the test part with the ``split`` protocol (test queries,
the whole archive minus the query as database, cosine), the val part against the train part,
and the same numbers for the backbone's own features and for the embedding before training
(no ``test_predictions.csv`` or confusion matrix).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from landlens.errors import CheckpointError, DatasetError
from landlens.atomic import atomic_write_bytes
from landlens.models.classifier import Classifier, Embedder, EmbeddingConfig, HeadConfig, save_classifier
from landlens.training.config import TrainConfig, config_from_dict
from landlens.training.datamodule import (
    FeatureDataModule,
    PreparedData,
    SceneDataModule,
    check_images,
    feature_rows,
    prepare_data,
)
from landlens.training.evaluation import ClassificationReport
from landlens.training.runs import (
    CONFIG_FILE,
    RESULTS_FILE,
    RunDir,
    RunResult,
    environment,
    fit,
    unwrap_worker_error,
)
from landlens.training.task import ClassificationTask, TrainingTask, build_network, head_param_groups


def _precision(cfg: TrainConfig) -> str:
    p = str(cfg.trainer.precision)
    if p == "auto":
        return "16-mixed" if torch.cuda.is_available() else "32-true"
    return "32-true" if p == "32" else p


def build_model(cfg: TrainConfig, classes: Sequence[str]) -> Classifier | Embedder:
    """The classifier (or, with ``model.embedding_dim``, the embedder) a config describes, with
    its starting weights and preprocessing."""
    m = cfg.model
    embedding = EmbeddingConfig(int(m.embedding_dim), bool(m.embedding_bn)) if m.embedding_dim is not None else None
    return build_network(m.backbone, m.weights, classes, head=HeadConfig(m.head, m.dropout, m.hidden, m.reduction),
                         embedding=embedding, input_size=cfg.data.input_size, resize_mode=cfg.data.resize_mode)


def _use_feature_cache(cfg: TrainConfig, model: Classifier | Embedder) -> bool:
    return (cfg.model.strategy == "linear" and cfg.data.augment == "none" and cfg.data.cache_features == "auto"
            and model.backbone.weights.digest is not None)


def train(cfg: TrainConfig, *, resume: bool = False, callbacks: Sequence[L.Callback] = (),
          progress: bool = True, cache_dir: str | Path = "runs/features", command: str | None = None) -> RunResult:
    """Divide, train, evaluate and save one run (see the module docstring for the run directory).

    Args:
        cfg: the validated run config.
        resume: continue from ``checkpoints/last.ckpt`` of ``cfg.out`` (the config must match).
        callbacks: extra Lightning callbacks.
        progress: show Lightning's progress bar.
        cache_dir: feature cache used by the frozen-backbone fast path.
        command: the command line recorded in ``results.json``.
    """
    cfg.validate()
    run = RunDir.start(cfg, resume=resume)
    run_dir = run.path
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    t_start = time.perf_counter()

    data = prepare_data(cfg.data, split_out=run_dir / "split.json")
    if cfg.data.verify:
        check_images(data, workers=max(1, cfg.data.num_workers))
    has_val = data.val_part is not None
    monitor = cfg.trainer.monitor if has_val else "train_loss"
    task: TrainingTask
    if cfg.is_metric:
        from landlens.training.strategies import apply_strategy

        model: Classifier | Embedder = build_model(cfg, data.classes)
        strategy = apply_strategy(model, cfg.model.strategy, unfreeze_stages=cfg.model.unfreeze_stages)
    else:
        task = ClassificationTask.from_config(cfg, data.classes, monitor=monitor)
        model, strategy = task.model, task.strategy_report
    use_cache = _use_feature_cache(cfg, model)
    o = cfg.optim
    spc = cfg.samples_per_class()
    if use_cache:
        from landlens.features.cache import cached_features

        # the RNG state after this point must not depend on whether the features were extracted now or reused
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            fs = cached_features(data.dataset.root, data.dataset.name if data.dataset.spec else None, model.backbone,
                                 cache_dir=cache_dir, progress=progress, command=command)
        rows = feature_rows(fs.paths, data.dataset.paths)
        dm: L.LightningDataModule = FeatureDataModule(fs.features[rows], data.dataset.labels, data.parts,
                                                      batch_size=cfg.data.batch_size,
                                                      eval_batch_size=cfg.data.eval_batch_size, seed=cfg.trainer.seed,
                                                      samples_per_class=spc)
    else:
        from landlens.training.augment import build_eval_transform, build_train_transform

        pre = model.backbone.preprocessing
        dm = SceneDataModule(data, build_train_transform(cfg.data.augment, pre), build_eval_transform(pre),
                             preprocessing=pre, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                             num_workers=cfg.data.num_workers, seed=cfg.trainer.seed, samples_per_class=spc)
    if spc:  # the class-balanced sampler checks the batch size against the train part now, not mid-fit
        dm.train_dataloader()
    start: dict[str, Any] | None = None
    if cfg.is_metric:
        from landlens.training.metric import MetricTask, metric_loss_from_config
        from landlens.training.strategies import param_groups

        assert cfg.model.embedding_dim is not None
        net: torch.nn.Module = model.head if use_cache else model
        groups = (head_param_groups(net, o.lr, o.weight_decay) if use_cache else
                  param_groups(model, o.lr, backbone_lr_mult=o.backbone_lr_mult, weight_decay=o.weight_decay))
        n_train_classes = len(np.unique(np.asarray(data.dataset.labels)[data.parts["train"]]))
        metric_loss = metric_loss_from_config(cfg.loss, len(data.classes), int(cfg.model.embedding_dim))
        if n_train_classes < 2:
            raise DatasetError(f"metric learning needs at least 2 classes in the train part, got {n_train_classes}")
        groups = groups + metric_loss.param_groups(o.lr, cfg.loss.proxy_lr_mult)
        start = _metric_start(net, dm, data, progress)
        task = MetricTask(net, metric_loss, o, cfg.trainer.epochs, param_groups=groups, monitor=monitor)
    elif use_cache:
        task.use_cached_features()

    t = cfg.trainer
    result = fit(task, dm, run, resume=resume, monitor=monitor, patience=t.patience,
                 checkpoint_every_n_steps=t.checkpoint_every_n_steps, validate=has_val, reload_best=has_val,
                 callbacks=callbacks, progress=progress, max_epochs=t.epochs, accelerator=t.accelerator,
                 devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=_precision(cfg),
                 deterministic=t.deterministic, limit_train_batches=t.limit_train_batches,
                 log_every_n_steps=t.log_every_n_steps)
    if result.interrupted:
        return run.interrupted(f"landlens train run --resume {run_dir / CONFIG_FILE}")
    if result.trainer.global_rank != 0:
        return RunResult(run_dir, "complete")

    rgb = getattr(data.dataset.spec, "rgb_bands", None) if data.dataset.spec is not None else None
    save_classifier(model, run_dir, extra={"rgb_bands": list(rgb)} if rgb else None)
    record = dict(command=command, cfg=cfg, data=data, model=model, strategy=strategy, use_cache=use_cache,
                  history=result.history, best_epoch=result.best_epoch, fit_s=result.seconds, t_start=t_start)
    if cfg.is_metric:
        assert isinstance(model, Embedder)
        return _finish_metric(task, dm, run, start or {}, **record)

    t_eval = time.perf_counter()
    try:
        report = evaluate_task(task, dm, data, run_dir, bootstrap=cfg.trainer.bootstrap, seed=cfg.trainer.seed)
    except DatasetError as exc:
        raise unwrap_worker_error(exc) from None
    test = report.to_dict()
    eval_s = time.perf_counter() - t_eval
    _plots(run_dir, result.history, test, data.classes)
    results = {**_run_record(eval_s=eval_s, **record), "test": test, "test_summary": report.summary_line()}
    (run_dir / "report.md").write_text(report.to_markdown() + "\n")
    return run.complete(results)


def _metric_start(net: torch.nn.Module, dm: Any, data: PreparedData, progress: bool) -> dict[str, Any]:
    """Retrieval before training: of the backbone's own features and of the initial embedding."""
    from landlens.training.metric import embed_loader, evaluate_split

    rows, loader = dm.split_dataloader()
    try:
        feats, emb, _ = embed_loader(net, loader)
    except DatasetError as exc:
        raise unwrap_worker_error(exc) from None
    out = {}
    for key, x in (("backbone", feats), ("embedding", emb)):
        rep = evaluate_split(x, rows, data, key)
        out[key] = {"val": rep.val_metrics(), "test": rep.test.metrics}
    return out


def _run_record(*, command: str | None, cfg: TrainConfig, data: PreparedData, model: Classifier | Embedder,
                strategy: Any, use_cache: bool, history: list[dict[str, Any]], best_epoch: int | None,
                fit_s: float, eval_s: float, t_start: float) -> dict[str, Any]:
    """The part of ``results.json`` every run has: command, environment, config, data, model, timings."""
    return {
        "command": command or " ".join(sys.argv),
        "environment": environment(),
        "config": cfg.to_dict(),
        "data": data.summary(),
        "model": model.describe(),
        "strategy": strategy.to_dict(),
        "feature_cache": use_cache,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "timing_s": {"fit": round(fit_s, 2), "test": round(eval_s, 2),
                     "total": round(time.perf_counter() - t_start, 2)},
    }


def _finish_metric(task: TrainingTask, dm: Any, run: RunDir, start: dict[str, Any], **record: Any) -> RunResult:
    """Evaluate a metric-learning run's (best) embedding and write results.json and report.md.

    ``record``: the arguments of :func:`_run_record` but ``eval_s``.
    """
    from landlens.training.metric import embed_loader, evaluate_split

    cfg: TrainConfig = record["cfg"]
    data: PreparedData = record["data"]
    t_eval = time.perf_counter()
    rows, loader = dm.split_dataloader()
    try:
        _, emb, _ = embed_loader(task.net, loader)
    except DatasetError as exc:
        raise unwrap_worker_error(exc) from None
    name = f"run:{run.path.name}"
    rep = evaluate_split(emb, rows, data, name)
    eval_s = time.perf_counter() - t_eval
    history = record["history"]
    if history:
        from landlens.reports.figures import plot_learning_curves

        plot_learning_curves(history, run.path / "learning_curves.png")
    test = rep.test.to_dict()
    m = rep.test.metrics
    summary = (f"test retrieval (split protocol, {rep.test.protocol.n_queries} test queries, archive minus query): "
               f"mAP {100 * m['mAP']:.2f}, ANMRR {m['ANMRR']:.4f}, P@10 {100 * m.get('P@10', float('nan')):.2f}")
    val = rep.val_metrics()
    if val is not None:
        summary += f"; val mAP {100 * val['mAP']:.2f}"
    results = {
        **_run_record(eval_s=eval_s, **record),
        "task": "metric",
        "loss": task.loss_fn.describe(),
        "samples_per_class": cfg.samples_per_class(),
        "val": rep.to_dict()["val"],
        "test": test,
        "start": start,
        "test_summary": summary,
        "backbone": f"run:{run.path.resolve()}",
    }
    (run.path / "report.md").write_text(_metric_markdown(rep, start, name) + "\n")
    return run.complete(results)


def _metric_markdown(rep: Any, start: dict[str, Any], name: str) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None or v != v else f"{100 * float(v):.2f}"

    rows = [("backbone features (no training)", start.get("backbone") or {}),
            ("embedding before training", start.get("embedding") or {}),
            (f"trained embedding ({name})", {"val": rep.val_metrics(), "test": rep.test.metrics})]
    lines = ["| features | val mAP | test mAP | test ANMRR | test P@10 |", "|---|---|---|---|---|"]
    for label, r in rows:
        t = r.get("test") or {}
        anmrr = t.get("ANMRR")
        lines.append(f"| {label} | {pct((r.get('val') or {}).get('mAP'))} | {pct(t.get('mAP'))} | "
                     f"{'-' if anmrr is None else f'{anmrr:.4f}'} | {pct(t.get('P@10'))} |")
    lines += ["", "val: the val part queries the train part; test: split protocol, the test part queries the whole "
              "archive minus the query; cosine similarity, relevance = same class.", "", rep.test.to_markdown()]
    return "\n".join(lines)


@torch.inference_mode()
def evaluate_task(task: TrainingTask, dm: L.LightningDataModule, data: PreparedData, run_dir: Path, *,
                  bootstrap: int = 1000, seed: int = 0) -> "ClassificationReport":
    """Predict the test part, write ``test_predictions.csv`` and return the classification report."""
    from landlens.training.evaluation import classification_report

    probs_list, ys = [], []
    task.eval()
    for x, y in dm.test_dataloader():
        probs_list.append(task.net(x).float().exp())
        ys.append(y)
    probs = torch.cat(probs_list).numpy()
    y_true = torch.cat(ys).numpy()
    y_pred = probs.argmax(1)
    rep = classification_report(y_true, y_pred, data.classes, probs=probs, n_boot=bootstrap, seed=seed)
    idx = data.parts["test"]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["path", "true", "predicted", "probability", "correct"])
    for i, t_, p_, pr in zip(idx, y_true, y_pred, probs):
        w.writerow([data.dataset.paths[int(i)], data.classes[int(t_)], data.classes[int(p_)],
                    f"{float(pr[p_]):.6f}", int(t_ == p_)])
    atomic_write_bytes(run_dir / "test_predictions.csv", text.getvalue().encode())
    return rep


def _plots(run_dir: Path, history: list[dict[str, Any]], test: dict[str, Any], classes: list[str]) -> None:
    from landlens.reports.figures import plot_confusion_matrix, plot_learning_curves

    cm = np.asarray((test.get("confusion") or {}).get("counts", []))
    if cm.size:
        plot_confusion_matrix(cm, classes, run_dir / "confusion_matrix.png", normalize=True,
                              title=f"test OA {100 * float(test.get('accuracy', 0)):.2f}%")
    if history:
        plot_learning_curves(history, run_dir / "learning_curves.png")


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config saved in a run directory."""
    p = Path(run_dir)
    path = p if p.suffix == ".json" else p / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{p} is not a landlens run directory: {CONFIG_FILE} not found")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return config_from_dict(raw, str(path))


__all__ = ["CONFIG_FILE", "RESULTS_FILE", "RunResult", "build_model", "environment", "evaluate_task",
           "load_run_config", "train"]
