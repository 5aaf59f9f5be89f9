"""One run infrastructure for every training command: run directories, history, checkpoints, the fit.

Classification and metric-learning runs (:mod:`landlens.training.engine`) and the matching steps
(:mod:`landlens.matching.pipeline`) lay out their run directory the same way::

    config.json            the resolved config (a resume must match it)
    checkpoints/last.ckpt  resume point, saved after every epoch (tensors and plain values only:
                           loaded with weights_only)
    checkpoints/best.ckpt  best epoch by the monitored metric
    history.csv/.json      per-epoch metrics, learning rate and time
    results.json           what the run produced; written last, so its presence marks a finished run

and train through :func:`fit`: a Lightning ``Trainer`` with those checkpoints and that history
(:func:`run_callbacks`), optional early stopping, resume from ``last.ckpt`` with the RNG state
(:class:`RNGStateCheckpoint`: a resumed run ends with the weights of an uninterrupted one),
Ctrl+C handling (the run stops at its last checkpoint and can be resumed), and the best weights
loaded back at the end. :class:`RunDir` refuses to overwrite a run and to resume one with
another config, naming the keys that changed.

The library leaves Lightning's loggers as it finds them; the ``landlens`` command quiets them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import lightning as L
import torch

from landlens.errors import CheckpointError, ConfigError, DatasetError
from landlens.atomic import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from landlens.config import RunConfig

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
_RNG_KEY = "landlens_rng"


def environment() -> dict[str, Any]:
    """Versions and hardware recorded with every result."""
    from landlens import __version__

    return {"landlens": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def monitor_mode(monitor: str) -> str:
    """``'max'`` for accuracy and mAP monitors, ``'min'`` for losses."""
    return "max" if monitor.endswith(("acc", "map")) else "min"


def unwrap_worker_error(exc: DatasetError) -> DatasetError:
    """A DataLoader worker wraps the error in a traceback; keep only the original message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return exc
    prefix = "landlens.errors.DatasetError: "
    msg = next((ln[len(prefix):] for ln in reversed(lines) if ln.startswith(prefix)), lines[-1])
    return DatasetError(msg)


def log_loss_and_accuracy(module: L.LightningModule, stage: str, loss: Any, scores: Any, target: Any) -> None:
    """Log ``{stage}_loss`` and ``{stage}_acc`` (argmax of ``scores`` against ``target``) per epoch,
    as every landlens task does (checkpoints and early stopping monitor these names)."""
    acc = (scores.argmax(1) == target).float().mean()
    n = len(target)
    module.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
    module.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)


class RNGStateCheckpoint:
    """Lightning-module mixin: the torch (and CUDA) RNG state travels in every checkpoint.

    Restored on resume, so dropout and augmentation draw the same numbers as an uninterrupted run.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[_RNG_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_RNG_KEY)
        if state:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunResult:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    status: str  # 'complete' | 'interrupted'
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return (self.results.get("test") or {}).get("accuracy")

    @property
    def map(self) -> float | None:
        """Test mAP of a metric-learning run (split protocol), ``None`` for a classifier."""
        return ((self.results.get("test") or {}).get("metrics") or {}).get("mAP")


class RunDir:
    """A run directory (see the module docstring): its files, the checks before a run, its results.

    Args:
        path: the directory (``config.out``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.ckpt"

    @property
    def finished(self) -> bool:
        """``results.json`` is there: the run completed."""
        return (self.path / RESULTS_FILE).is_file()

    def check(self, config: RunConfig, *, resume: bool) -> None:
        """Refuse to start over an existing run, or to resume without a checkpoint or with another config.

        Raises:
            CheckpointError: ``resume`` and no ``checkpoints/last.ckpt``.
            ConfigError: ``resume`` with a config whose values differ from the saved
                ``config.json`` (the changed keys are named), or no ``resume`` and the directory
                already holds a run.
        """
        if not resume:
            if self.finished or self.checkpoint_dir.is_dir():
                raise ConfigError(f"run directory {self.path} already holds a run; pass --resume to continue it "
                                  "or choose another out=")
            return
        if not self.last_checkpoint.is_file():
            raise CheckpointError(f"nothing to resume in {self.path}: {CHECKPOINT_DIR}/last.ckpt not found")
        saved = self.path / CONFIG_FILE
        if not saved.is_file():
            return
        old = json.loads(saved.read_text())
        new = json.loads(json.dumps(config.to_dict()))
        try:  # the defaults of the config's own type (classification or matching)
            defaults = json.loads(json.dumps(type(config)().to_dict()))
        except TypeError:
            defaults = {}
        # a key that a run saved by an older landlens lacks matches when the new value is its default
        diff = sorted(f"{s}.{k}" for s in new if isinstance(new[s], dict)
                      for k in new[s] if (old.get(s) or {}).get(k, (defaults.get(s) or {}).get(k)) != new[s][k])
        if diff:
            raise ConfigError(f"cannot resume {self.path} with a different config: {', '.join(diff[:5])} changed")

    @classmethod
    def start(cls, config: RunConfig, *, resume: bool = False) -> "RunDir":
        """Check ``config.out`` (:meth:`check`), create it and write ``config.json``."""
        run = cls(config.out)  # type: ignore[attr-defined]
        run.check(config, resume=resume)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_json(CONFIG_FILE, config.to_dict())
        return run

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as ``name`` in the run directory, atomically."""
        path = self.path / name
        atomic_write_json(path, obj)
        return path

    def read_results(self) -> dict[str, Any]:
        """The ``results.json`` of a finished run."""
        return json.loads((self.path / RESULTS_FILE).read_text())

    def complete(self, results: dict[str, Any]) -> RunResult:
        """Write ``results.json`` (the mark of a finished run) and return the result."""
        self.write_json(RESULTS_FILE, results)
        return RunResult(self.path, "complete", results)

    def interrupted(self, resume_command: str) -> RunResult:
        """The result of a run stopped by Ctrl+C; ``resume_command`` continues it."""
        return RunResult(self.path, "interrupted", {"resume": resume_command})


class History(L.Callback):
    """Per-epoch metrics to ``history.csv`` / ``history.json`` (rewritten atomically each epoch).

    A resumed run keeps the epochs its ``history.json`` already has. ``rows`` holds one dict per
    epoch: ``epoch`` (from 1), the logged ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc`` and ``val_map`` there are, the first parameter group's ``lr`` and ``epoch_s``.
    """

    COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_s")
    METRIC_COLUMNS = ("epoch", "train_loss", "val_map", "lr", "epoch_s")
    METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_map")

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        path = self.run_dir / HISTORY_JSON
        if path.is_file():
            try:
                self.rows = list(json.loads(path.read_text()))
            except ValueError:
                self.rows = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": int(trainer.current_epoch) + 1}
        for k in self.METRICS:
            if k in m:
                row[k] = float(m[k])
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
        row["epoch_s"] = round(time.perf_counter() - self._t0, 3)
        self.rows = [r for r in self.rows if r.get("epoch") != row["epoch"]] + [row]
        self.save()

    def save(self) -> None:
        atomic_write_json(self.run_dir / HISTORY_JSON, self.rows)
        text = io.StringIO(newline="")
        columns = self.METRIC_COLUMNS if any("val_map" in r for r in self.rows) else self.COLUMNS
        w = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.run_dir / HISTORY_CSV, text.getvalue().encode())


@dataclass
class RunCallbacks:
    """The callbacks of a run, by name.

    Attributes:
        history: the :class:`History`.
        best: ``checkpoints/best.ckpt``, the best epoch by the monitored metric.
        last: ``checkpoints/last.ckpt`` after every epoch (Lightning's ``save_last`` only
            follows epochs that improved the monitored metric).
        last_every_n_steps: also ``last.ckpt`` every n optimiser steps (resume mid-epoch), or ``None``.
        early_stopping: ``None`` without a patience.
    """

    history: History
    best: ModelCheckpoint
    last: ModelCheckpoint
    last_every_n_steps: ModelCheckpoint | None = None
    early_stopping: EarlyStopping | None = None

    def as_list(self) -> list[L.Callback]:
        cbs: list[L.Callback | None] = [self.best, self.history, self.last, self.last_every_n_steps,
                                        self.early_stopping]
        return [c for c in cbs if c is not None]


def run_callbacks(run_dir: RunDir | str | os.PathLike[str], monitor: str, *, patience: int | None = None,
                  checkpoint_every_n_steps: int | None = None) -> RunCallbacks:
    """Checkpoints, history and early stopping of a run in ``run_dir``, watching ``monitor``."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    mode = monitor_mode(monitor)
    ckpt_dir = run.checkpoint_dir
    return RunCallbacks(
        history=History(run.path),
        best=ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_last=False,
                             save_top_k=1, enable_version_counter=False),
        last=ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_last=False, save_top_k=1,
                             enable_version_counter=False),
        last_every_n_steps=(ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_last=False,
                                            save_top_k=1, every_n_train_steps=int(checkpoint_every_n_steps),
                                            enable_version_counter=False)
                            if checkpoint_every_n_steps else None),
        early_stopping=(EarlyStopping(monitor=monitor, mode=mode, patience=int(patience))
                        if patience is not None else None),
    )


@dataclass
class FitResult:
    """What :func:`fit` leaves: the trainer, the run's callbacks, the time and the best epoch.

    Attributes:
        trainer: the Lightning trainer (``trainer.interrupted`` after Ctrl+C).
        callbacks: the run's callbacks (``callbacks.history.rows``: the per-epoch metrics).
        seconds: wall time of the fit.
        best_epoch: the epoch (from 1) whose weights the task holds, when they were reloaded.
    """

    trainer: L.Trainer
    callbacks: RunCallbacks
    seconds: float
    best_epoch: int | None

    @property
    def interrupted(self) -> bool:
        return bool(self.trainer.interrupted)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.callbacks.history.rows


def fit(task: L.LightningModule, datamodule: L.LightningDataModule, run_dir: RunDir | str | os.PathLike[str], *,
        resume: bool = False, monitor: str = "val_loss", patience: int | None = None,
        checkpoint_every_n_steps: int | None = None, validate: bool = True, reload_best: bool = True,
        callbacks: Sequence[L.Callback] = (), progress: bool = True, **trainer_args: Any) -> FitResult:
    """Train ``task`` on ``datamodule`` as a run in ``run_dir``; load the best weights back.

    Args:
        task, datamodule: what Lightning fits.
        run_dir: the run directory (created and checked by :meth:`RunDir.start`).
        resume: continue from ``checkpoints/last.ckpt`` (weights, optimiser, schedule, epoch,
            RNG state).
        monitor: the metric of ``best.ckpt`` and early stopping (its mode: :func:`monitor_mode`).
        patience: early stopping after this many epochs without a better ``monitor``; ``None``: off.
        checkpoint_every_n_steps: also save ``last.ckpt`` every n optimiser steps.
        validate: run the validation loop (``False`` when the data has no validation part).
        reload_best: load ``best.ckpt`` into ``task`` after a complete fit (rank 0).
        callbacks: extra Lightning callbacks.
        progress: Lightning's progress bar.
        trainer_args: further ``lightning.Trainer`` arguments (``max_epochs``, ``accelerator``,
            ``devices``, ``precision``...).

    A Ctrl+C stops the fit at its last checkpoint: the result's ``interrupted`` is then true
    and the task is left as it was. Otherwise the task comes back on the CPU in eval mode.
    Errors of the data (:class:`~landlens.errors.DatasetError`) come out as one line.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cbs = run_callbacks(run, monitor, patience=patience, checkpoint_every_n_steps=checkpoint_every_n_steps)
    trainer = L.Trainer(callbacks=[*cbs.as_list(), *callbacks], logger=False, enable_progress_bar=progress,
                        enable_model_summary=False, default_root_dir=str(run.path), num_sanity_val_steps=0,
                        limit_val_batches=1.0 if validate else 0, **trainer_args)
    t0 = time.perf_counter()
    task.train()  # Lightning keeps modules in the mode it finds them; frozen BatchNorm goes back to eval per epoch
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(run.last_checkpoint) if resume else None,
                    weights_only=True)
    except SystemExit:  # Lightning exits after tearing down on Ctrl+C; the last checkpoint is kept
        if not trainer.interrupted:
            raise
    except DatasetError as exc:
        raise unwrap_worker_error(exc) from None
    seconds = time.perf_counter() - t0
    best_epoch = None
    if trainer.interrupted or trainer.global_rank != 0:
        return FitResult(trainer, cbs, seconds, best_epoch)
    if reload_best and run.best_checkpoint.is_file():
        ckpt = torch.load(str(run.best_checkpoint), map_location="cpu", weights_only=True)
        task.load_state_dict(ckpt["state_dict"])
        best_epoch = int(ckpt.get("epoch", -1)) + 1
    task.to("cpu").eval()
    return FitResult(trainer, cbs, seconds, best_epoch)


__all__ = [
    "log_loss_and_accuracy",
    "CONFIG_FILE",
    "FitResult",
    "History",
    "RESULTS_FILE",
    "RNGStateCheckpoint",
    "RunCallbacks",
    "RunDir",
    "RunResult",
    "environment",
    "fit",
    "monitor_mode",
    "run_callbacks",
    "unwrap_worker_error",
]
