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
    "PairSampler": "landlens.matching.train",
    "encode_dataset": "landlens.matching.train",
    "evaluate_matching": "landlens.matching.train",
    "finetune_ae": "landlens.matching.train",
    "load_autoencoder": "landlens.matching.train",
    "pretrain_ae": "landlens.matching.train",
    "save_autoencoder": "landlens.matching.train",
    "train_dml": "landlens.matching.train",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'landlens.matching' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
