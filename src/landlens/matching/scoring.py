"""Scoring query images against an archive with a trained matching discriminator.

The discriminator of Khurshid et al. ("A Residual-Dyad Encoder Discriminator Network for Remote
Sensing Image Matching") scores one *pair* of feature maps at a time, so ranking an archive of
``N`` images costs ``N`` network evaluations per query. Its first layer is a convolution on the
concatenation ``cat(a, b)``, which is linear, hence::

    conv(cat(a, b)) = W_a * a + W_b * b + bias = first_a(a) + first_b(b)

:class:`PairScorer` applies ``first_b`` once per archive item (:meth:`PairScorer.prepare_db`,
reusable for every query), ``first_a`` once per query, and per pair runs only the addition and
the rest of the network (BN, ReLU, residual unit, convolution, fully connected layer), in
batches. The probabilities equal those of the whole network on every pair
(:meth:`PairScorer.score_naive`) up to float rounding. The saving is the first convolution's
share of the work: ``2C x width x 9`` multiply-adds per output pixel out of the whole
network's, i.e. about 73 % for the default 8x8x512 discriminator of width 128 (75.5 M of 104 M
multiply-adds per pair): at equal arithmetic efficiency exact scoring can gain at most about
3.7x (prepared features are kept channels-last, the layout in which the per-pair convolutions
run fastest on CPU, which recovers part of the efficiency lost to their small spatial size).

:func:`match_distance` turns probabilities into a retrieval distance ``1 - P(match)`` and can
restrict the discriminator to a Euclidean shortlist; :class:`LearnedDistance` is the same as a
retrieval :class:`~landlens.retrieval.distances.Distance` registered as ``"learned"``, built by
:func:`learned` from a directory written by :func:`save_discriminator`.

Shortlist cost and benefit: with ``shortlist=k`` a query costs one Euclidean distance row
(a matrix product, microseconds per archive item) plus ``k`` discriminator evaluations
instead of ``N``, so exact scoring's cost falls by about ``N / k``; ranks ``1..k`` come from
the discriminator and the rest keep their Euclidean order. The price is recall: a relevant
image outside the Euclidean top ``k`` can never be promoted by the discriminator, so the
learned ranking is only as good as the shortlist's recall at ``k`` allows.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from landlens.atomic import atomic_write_json
from landlens.errors import CheckpointError, ConfigError, LandlensError, first_line
from landlens.matching.networks import DMLConfig, FeatureMismatchError, MatchingDiscriminator
from landlens.retrieval.distances import BaseDistance

DISCRIMINATOR_FORMAT = "landlens-matching-discriminator"
DISCRIMINATOR_FORMAT_VERSION = 1
DISCRIMINATOR_WEIGHTS = "discriminator.safetensors"
DISCRIMINATOR_META = "discriminator.json"
DEFAULT_BATCH_PAIRS = 4096
#: Items per batch when applying the first convolution to queries or archive items.
PREPARE_BATCH = 512


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode inside; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _match_probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)[:, 1]


#: Memory format of prepared features: the per-pair 3x3 convolutions on 128 channels at 8x8 and
#: 4x4 run about 20-30 % faster in it on CPU (oneDNN) than in the default NCHW layout.
PREPARED_FORMAT = torch.channels_last


class PairScorer:
    """Match probabilities of (query, archive item) pairs with the first convolution factored out.

    Usage::

        scorer = PairScorer(discriminator)
        db = scorer.prepare_db(archive_features)      # once per archive
        p = scorer.score(scorer.prepare_query(query_features), db)   # (nq, ndb) P(match)

    Features are ``(N, C, H, W)`` maps or flattened rows ``(N, C*H*W)``; all computation runs in
    eval mode under :func:`torch.inference_mode`.
    """

    def __init__(self, discriminator: MatchingDiscriminator) -> None:
        self.model = discriminator

    def _param(self) -> torch.Tensor:
        return self.model.first_a.weight

    def _maps(self, feats: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
        p = self._param()
        x = torch.as_tensor(feats).to(device=p.device, dtype=p.dtype)
        return self.model.as_feature_maps(x, what)

    def _apply(self, conv: nn.Module, feats: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
        x = self._maps(feats, what)
        with _evaluating(self.model):
            parts = [conv(x[i:i + PREPARE_BATCH]) for i in range(0, x.shape[0], PREPARE_BATCH)]
            if not parts:
                c, h, w = self.model.features_shape
                return torch.empty((0, self.model.config.width, h, w), dtype=x.dtype, device=x.device)
            return torch.cat(parts).contiguous(memory_format=PREPARED_FORMAT)

    def _tail(self, z: torch.Tensor) -> torch.Tensor:
        """P(match) of first-convolution outputs ``z`` (the per-pair part of the network)."""
        return _match_probability(self.model.tail(z.contiguous(memory_format=PREPARED_FORMAT)))

    def prepare_db(self, feats: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``first_b`` of every archive item: ``(N, width, H, W)`` (channels-last), computed once per archive."""
        return self._apply(self.model.first_b, feats, "database features")

    def prepare_query(self, feats: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``first_a`` (with the bias) of every query: ``(nq, width, H, W)`` (channels-last)."""
        return self._apply(self.model.first_a, feats, "query features")

    def score(self, q_prepared: torch.Tensor, db_prepared: torch.Tensor,
              batch_pairs: int = DEFAULT_BATCH_PAIRS) -> torch.Tensor:
        """P(match) ``(nq, ndb)`` of every prepared query with every prepared archive item.

        Pairs are evaluated ``batch_pairs`` at a time: whole rows of several queries when the
        archive is small, else slices of the archive for one query.
        """
        nq, ndb = q_prepared.shape[0], db_prepared.shape[0]
        batch_pairs = max(1, int(batch_pairs))
        out = torch.empty((nq, ndb), dtype=torch.float32, device=q_prepared.device)
        if nq == 0 or ndb == 0:
            return out
        with _evaluating(self.model):
            if ndb <= batch_pairs:
                rows = max(1, batch_pairs // ndb)
                for i in range(0, nq, rows):
                    q = q_prepared[i:i + rows]
                    z = (q[:, None] + db_prepared[None]).flatten(0, 1)
                    out[i:i + q.shape[0]] = self._tail(z).view(q.shape[0], ndb)
            else:
                for i in range(nq):
                    for j in range(0, ndb, batch_pairs):
                        z = q_prepared[i:i + 1] + db_prepared[j:j + batch_pairs]
                        out[i, j:j + z.shape[0]] = self._tail(z)
        return out

    def score_pairs(self, q_prepared: torch.Tensor, db_prepared: torch.Tensor, q_index: torch.Tensor,
                    db_index: torch.Tensor, batch_pairs: int = DEFAULT_BATCH_PAIRS) -> torch.Tensor:
        """P(match) of the pairs ``(q_prepared[q_index[t]], db_prepared[db_index[t]])``, shape ``(P,)``."""
        n = int(q_index.shape[0])
        out = torch.empty((n,), dtype=torch.float32, device=q_prepared.device)
        batch_pairs = max(1, int(batch_pairs))
        with _evaluating(self.model):
            for s in range(0, n, batch_pairs):
                z = q_prepared[q_index[s:s + batch_pairs]] + db_prepared[db_index[s:s + batch_pairs]]
                out[s:s + z.shape[0]] = self._tail(z)
        return out

    def score_naive(self, q_feats: torch.Tensor | np.ndarray, db_feats: torch.Tensor | np.ndarray,
                    batch_pairs: int = DEFAULT_BATCH_PAIRS) -> torch.Tensor:
        """The reference: the whole discriminator, one convolution on ``cat(q, db)``, for every pair.

        Returns P(match) ``(nq, ndb)``; :meth:`score` gives the same values faster.
        """
        q = self._maps(q_feats, "query features")
        db = self._maps(db_feats, "database features")
        nq, ndb = q.shape[0], db.shape[0]
        batch_pairs = max(1, int(batch_pairs))
        out = torch.empty((nq, ndb), dtype=torch.float32, device=q.device)
        with _evaluating(self.model):
            for i in range(nq):
                for j in range(0, ndb, batch_pairs):
                    d = db[j:j + batch_pairs]
                    pair = torch.cat([q[i:i + 1].expand(d.shape[0], -1, -1, -1), d], dim=1)
                    out[i, j:j + d.shape[0]] = _match_probability(self.model.forward_concat(pair))
        return out


# ----------------------------------------------------------------------------- distances

def _check_shortlist(shortlist: int | None) -> int | None:
    if shortlist is None:
        return None
    try:
        k = int(shortlist)
    except (TypeError, ValueError):
        raise ConfigError(f"shortlist must be a positive integer, got {shortlist!r}") from None
    if k < 1 or k != shortlist:
        raise ConfigError(f"shortlist must be a positive integer, got {shortlist!r}")
    return k


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """``|y|^2`` of every row (through ``vector_norm``, several times faster than ``vecdot`` on CPU)."""
    return torch.linalg.vector_norm(x, dim=1).square()


def _euclidean_shortlist(q_flat: torch.Tensor, db_flat: torch.Tensor, k: int, db_sq: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's Euclidean top ``k`` (``(nq, k)`` indices, nearest first) and the fallback
    distances ``1 + rank / ndb`` of every item, rank = 0-based Euclidean position (ties: lower index).

    Rows are ranked by ``|y|^2 - 2 x.y``, which orders the archive as ``|x - y|`` does for a fixed
    query ``x``: one matrix product per query block, with the archive's ``|y|^2`` (``db_sq``)
    computed once when given.
    """
    nq, ndb = q_flat.shape[0], db_flat.shape[0]
    if db_sq is None:
        db_sq = squared_norms(db_flat)
    key = torch.addmm(db_sq[None, :].to(q_flat.dtype), q_flat, db_flat.T, alpha=-2.0)
    order = torch.argsort(key, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(ndb, device=order.device).expand(nq, ndb))
    fallback = 1.0 + rank.to(torch.float32) / float(ndb)
    return order[:, :k], fallback


def match_distance(q_feats: torch.Tensor | np.ndarray, db_feats: torch.Tensor | np.ndarray, scorer: PairScorer,
                   shortlist: int | None = None, batch_pairs: int = DEFAULT_BATCH_PAIRS) -> torch.Tensor:
    """Learned distances ``(nq, ndb)``: ``1 - P(match)`` from the discriminator (in [0, 1]).

    With ``shortlist=k``, only each query's ``k`` Euclidean nearest archive items (on the
    flattened features) are scored by the discriminator, and only those items are prepared;
    every other item gets ``1 + r / ndb`` with ``r`` its 0-based Euclidean rank, so it ranks
    after the shortlist, in Euclidean order. Cost per query: one Euclidean row plus ``k``
    discriminator evaluations instead of ``ndb`` (see the module docstring for the trade-off).
    """
    k = _check_shortlist(shortlist)
    q = scorer._maps(q_feats, "query features")
    db = scorer._maps(db_feats, "database features")
    nq, ndb = q.shape[0], db.shape[0]
    qp = scorer.prepare_query(q)
    if k is None or k >= ndb:
        return 1.0 - scorer.score(qp, scorer.prepare_db(db), batch_pairs)
    with torch.inference_mode():
        top, dist = _euclidean_shortlist(q.flatten(1), db.flatten(1), k)
        needed, inverse = torch.unique(top, return_inverse=True)
        dbp = scorer.prepare_db(db[needed])
        q_index = torch.arange(nq, device=top.device)[:, None].expand(nq, k).reshape(-1)
        p = scorer.score_pairs(qp, dbp, q_index, inverse.reshape(-1), batch_pairs)
        dist.scatter_(1, top, (1.0 - p).view(nq, k))
    return dist


class LearnedDistance(BaseDistance):
    """``1 - P(match)`` of a trained :class:`MatchingDiscriminator` as a retrieval distance.

    Rows are flattened feature maps (``D = C*H*W``), reshaped to the discriminator's
    ``(C, H, W)``; a row length other than ``D`` raises :class:`FeatureMismatchError`.
    :meth:`prepare` applies both halves of the first convolution to every row (so one prepared
    matrix serves as queries and as database, as the archive protocol needs), and keeps the raw
    rows and their squared norms too when a Euclidean ``shortlist`` is used (see
    :func:`match_distance`). The distance is not symmetric.

    Attributes:
        scorer: the :class:`PairScorer`.
        shortlist: ``None`` (score every pair) or the number of Euclidean neighbours re-scored.
        meta: what :func:`read_discriminator_meta` returned, when loaded from a directory.
        source: where the discriminator came from (recorded by :meth:`to_dict`).
    """

    name = "learned"
    symmetric = False

    def __init__(self, discriminator: MatchingDiscriminator, shortlist: int | None = None, *,
                 batch_pairs: int = DEFAULT_BATCH_PAIRS, meta: dict[str, Any] | None = None,
                 source: str | None = None) -> None:
        self.scorer = PairScorer(discriminator)
        self.shortlist = _check_shortlist(shortlist)
        self.batch_pairs = int(batch_pairs)
        self.meta = meta or {}
        self.source = source

    @property
    def model(self) -> MatchingDiscriminator:
        return self.scorer.model

    def _describe(self) -> str:
        return f"discriminator {self.source}" if self.source else "the discriminator"

    def check(self, features: np.ndarray | torch.Tensor, what: str = "features") -> None:
        shape = tuple(features.shape)
        d = self.model.feature_dim
        if len(shape) != 2 or shape[1] != d:
            raise FeatureMismatchError(
                f"{what} have shape {shape}; the learned distance ({self._describe()}) takes rows of "
                f"{d} values (flattened (C, H, W) = {self.model.features_shape} maps)")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        a = self.scorer.prepare_query(x).flatten(1)
        b = self.scorer.prepare_db(x).flatten(1)
        parts = [a, b]
        if self.shortlist is not None:
            raw = x.to(a.dtype)
            parts += [raw, squared_norms(raw)[:, None]]
        return torch.cat(parts, dim=1)

    def _split(self, prepared: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _, h, w = self.model.features_shape
        shape = (self.model.config.width, h, w)
        p = shape[0] * h * w
        d = self.model.feature_dim
        expected = 2 * p + (d + 1 if self.shortlist is not None else 0)
        if prepared.ndim != 2 or prepared.shape[1] != expected:
            raise ValueError(f"not prepared by this distance: rows of {prepared.shape[-1]} values, expected {expected}")
        return (prepared[:, :p].reshape(-1, *shape), prepared[:, p:2 * p].reshape(-1, *shape),
                prepared[:, 2 * p:2 * p + d], prepared[:, 2 * p + d:].reshape(-1))

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        qa, _, q_raw, _ = self._split(q)
        _, dbb, db_raw, db_sq = self._split(db)
        nq, ndb = qa.shape[0], dbb.shape[0]
        k = self.shortlist
        with torch.inference_mode():
            if k is None or k >= ndb:
                value = 1.0 - self.scorer.score(qa, dbb, self.batch_pairs)
            else:
                top, value = _euclidean_shortlist(q_raw, db_raw, k, db_sq)
                q_index = torch.arange(nq, device=top.device)[:, None].expand(nq, k).reshape(-1)
                p = self.scorer.score_pairs(qa, dbb, q_index, top.reshape(-1), self.batch_pairs)
                value.scatter_(1, top, (1.0 - p).view(nq, k))
        if out is None:
            return value
        out.copy_(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "model": self.source, "shortlist": self.shortlist,
                             "discriminator": self.model.config.to_dict()}
        features = (self.meta.get("extra") or {}).get("features")
        if features is not None:
            d["features"] = features
        return d

    def __repr__(self) -> str:
        return f"LearnedDistance({self.source!r}, shortlist={self.shortlist})"


# ----------------------------------------------------------------------------- files

def save_discriminator(model: MatchingDiscriminator, directory: str | os.PathLike[str],
                       extra: dict[str, Any] | None = None) -> Path:
    """Write ``discriminator.safetensors`` and ``discriminator.json`` into ``directory`` (no pickle).

    ``extra`` is stored as is (JSON); ``extra["features"]`` should identify the features the
    discriminator was trained on (e.g. ``{"backbone": ..., "dim": ...}``) so that
    :func:`check_features` can refuse others later. Returns the path of the JSON file.
    """
    from landlens import __version__
    from landlens.models.tensorfile import save_module_tensors

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_module_tensors(model, d / DISCRIMINATOR_WEIGHTS)
    meta: dict[str, Any] = {
        "format": DISCRIMINATOR_FORMAT,
        "format_version": DISCRIMINATOR_FORMAT_VERSION,
        "landlens_version": __version__,
        "config": model.config.to_dict(),
        "features_shape": list(model.features_shape),
        "extra": extra or {},
    }
    atomic_write_json(d / DISCRIMINATOR_META, meta, indent=2, sort_keys=False)
    return d / DISCRIMINATOR_META


def _meta_path(directory: str | os.PathLike[str]) -> Path:
    p = Path(directory)
    return p if p.suffix == ".json" else p / DISCRIMINATOR_META


def read_discriminator_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``discriminator.json`` of a directory (or the file itself).

    Raises:
        CheckpointError: missing or unreadable file, another format or format version, or an
            invalid configuration; the message names the file.
    """
    meta_path = _meta_path(directory)
    if not meta_path.is_file():
        raise CheckpointError(f"no matching discriminator at {Path(directory)}: {meta_path.name} not found")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {meta_path}: {first_line(exc)}") from None
    if not isinstance(meta, dict) or meta.get("format") != DISCRIMINATOR_FORMAT:
        raise CheckpointError(f"{meta_path} is not a landlens matching-discriminator file")
    version = meta.get("format_version")
    if version != DISCRIMINATOR_FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has discriminator-file format {version!r} (written by landlens "
            f"{meta.get('landlens_version', '?')}); this landlens reads format {DISCRIMINATOR_FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path} lacks 'config'")
    try:
        DMLConfig.from_dict(meta["config"])
    except (LandlensError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: invalid discriminator config: {first_line(exc)}") from None
    return meta


def load_discriminator(directory: str | os.PathLike[str], *, map_location: str = "cpu") -> MatchingDiscriminator:
    """Rebuild a discriminator saved by :func:`save_discriminator` (eval mode, no pickle).

    Raises:
        CheckpointError: see :func:`read_discriminator_meta`; also missing, unreadable or
            mismatching tensors, naming the weights file.
    """
    from landlens.models.tensorfile import load_module_tensors

    meta_path = _meta_path(directory)
    meta = read_discriminator_meta(directory)
    cfg = DMLConfig.from_dict(meta["config"])
    model = MatchingDiscriminator(cfg)
    load_module_tensors(model, meta_path.parent / DISCRIMINATOR_WEIGHTS, what="discriminator",
                        map_location=map_location,
                        described=f"the discriminator described in {meta_path.name} ({cfg.to_dict()})")
    model.to(map_location)
    model.eval()
    return model


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_features(meta: dict[str, Any], feature_identity: dict[str, Any]) -> None:
    """Refuse features other than those the discriminator was trained on.

    Compares the keys present in both ``meta["extra"]["features"]`` (recorded at training) and
    ``feature_identity`` (e.g. ``{"backbone": "geoembed_v3", "dim": 32768}``); a discriminator
    with no recorded features is accepted.

    Raises:
        FeatureMismatchError: one line naming both identities.
    """
    recorded = (meta.get("extra") or {}).get("features")
    if not recorded:
        return
    rec, given = _normalised(recorded), _normalised(feature_identity)
    if not isinstance(rec, dict):
        rec = {"features": rec}
    differ = sorted(k for k in set(rec) & set(given) if rec[k] != given[k])
    if differ:
        raise FeatureMismatchError(
            f"the discriminator was trained on features {json.dumps(rec, sort_keys=True)}, "
            f"these are {json.dumps(given, sort_keys=True)} (differ in {', '.join(differ)})")


def learned(model: str | os.PathLike[str], shortlist: int | None = None, *,
            features: Any = None, batch_pairs: int = DEFAULT_BATCH_PAIRS) -> LearnedDistance:
    """The ``"learned"`` distance: ``get_distance("learned", model=<discriminator directory>)``.

    Args:
        model: a directory written by :func:`save_discriminator` (or its ``discriminator.json``).
        shortlist: re-score only each query's ``shortlist`` Euclidean neighbours (see :func:`match_distance`).
        features: identity of the features to be ranked (a dict, or the
            :class:`~landlens.features.store.FeatureSet` itself); refused if it contradicts the one
            recorded at training (:func:`check_features`).
        batch_pairs: pairs per discriminator batch.
    """
    meta = read_discriminator_meta(model)
    if features is not None and not isinstance(features, dict):
        from landlens.matching.files import feature_identity

        features = feature_identity(features)
    if features is not None:
        check_features(meta, features)
    disc = load_discriminator(model)
    return LearnedDistance(disc, shortlist, batch_pairs=batch_pairs, meta=meta, source=str(model))


__all__ = [
    "DEFAULT_BATCH_PAIRS",
    "DISCRIMINATOR_FORMAT_VERSION",
    "LearnedDistance",
    "PairScorer",
    "check_features",
    "learned",
    "load_discriminator",
    "match_distance",
    "read_discriminator_meta",
    "save_discriminator",
    "squared_norms",
]
