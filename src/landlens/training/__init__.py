"""Training scene classifiers: configuration, losses, transfer strategies, the training loop and evaluation.

:class:`ClassificationTask` (a LightningModule built from simple arguments) and
:class:`SceneDataModule` (``SceneDataModule.from_folder``) train in any ``lightning.Trainer``;
:func:`landlens.training.engine.train` runs a whole run from a config (``landlens train run``).
"""

from __future__ import annotations

from typing import Any

#: Names served lazily (they pull in Lightning, which e.g. prediction does not need).
_LAZY = {
    "ClassificationTask": "landlens.training.task",
    "MetricTask": "landlens.training.metric",
    "SceneDataModule": "landlens.training.datamodule",
    "FeatureDataModule": "landlens.training.datamodule",
    "train": "landlens.training.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'landlens.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
