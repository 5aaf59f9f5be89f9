"""The matching training API under its former single-module name.

The steps (pre-training and fine-tuning the autoencoder, training the discriminator,
evaluating retrieval) are :mod:`landlens.matching.pipeline`'s; the images and pairs
:mod:`landlens.matching.data`'s; the Lightning tasks :mod:`landlens.matching.tasks`'s; the
autoencoder files and the features made of them :mod:`landlens.matching.files`'s. Their public
names stay importable from here, so code written against ``landlens.matching.train`` keeps working.
"""

from __future__ import annotations

from landlens.matching.data import PairData, PairFeatures, PairSampler, list_images, prepare_pairs
from landlens.matching.files import (
    AE_FAMILY,
    IMAGES_FILE,
    SPLIT_FILE,
    ae_preprocessing,
    autoencoder_backbone,
    encode_dataset,
    feature_identity,
    feature_shape,
    load_autoencoder,
    read_autoencoder_meta,
    run_kind,
    save_autoencoder,
)
from landlens.matching.pipeline import (
    MatchingEvaluation,
    evaluate_matching,
    finetune_ae,
    load_run,
    pretrain_ae,
    resolve_features,
    train_dml,
)
from landlens.matching.tasks import AETask, DMLTask, pair_scores

__all__ = [
    "AETask",
    "AE_FAMILY",
    "DMLTask",
    "IMAGES_FILE",
    "MatchingEvaluation",
    "PairData",
    "PairFeatures",
    "PairSampler",
    "SPLIT_FILE",
    "ae_preprocessing",
    "autoencoder_backbone",
    "encode_dataset",
    "evaluate_matching",
    "feature_identity",
    "feature_shape",
    "finetune_ae",
    "list_images",
    "load_autoencoder",
    "load_run",
    "pair_scores",
    "prepare_pairs",
    "pretrain_ae",
    "read_autoencoder_meta",
    "resolve_features",
    "run_kind",
    "save_autoencoder",
    "train_dml",
]
