"""Residual-dyad image matching (Khurshid et al.): autoencoder features, a learned pair discriminator, fast scoring.

The discriminator is the retrieval distance ``"learned"`` (registered by name in
:mod:`landlens.retrieval.distances`, which imports :mod:`landlens.matching.scoring` on first use).
"""

from __future__ import annotations

from typing import Any

#: Names served lazily (training pulls in Lightning, which plain scoring does not need).
_LAZY = {
    "MatchingConfig": "landlens.matching.config",
    "load_matching_config": "landlens.matching.config",
    "PairSampler": "landlens.matching.data",
    "encode_dataset": "landlens.matching.files",
    "evaluate_matching": "landlens.matching.pipeline",
    "finetune_ae": "landlens.matching.pipeline",
    "load_autoencoder": "landlens.matching.files",
    "pretrain_ae": "landlens.matching.pipeline",
    "save_autoencoder": "landlens.matching.files",
    "train_dml": "landlens.matching.pipeline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'landlens.matching' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
