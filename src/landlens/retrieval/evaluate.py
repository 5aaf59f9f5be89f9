"""Evaluate retrieval on a feature set under a protocol: the library door of ``landlens retrieval evaluate``.

:func:`evaluate` resolves the protocol (:mod:`landlens.retrieval.protocols`), ranks every
query's database with the chosen distance (:mod:`landlens.retrieval.distances`) and scores
the rankings (:mod:`landlens.retrieval.metrics`): mAP, ANMRR (MPEG-7; Manjunath, Ohm,
Vasudevan and Yamada, IEEE TCSVT 2001), P@k, class-wise mAP and the top-k confusion. The
:class:`EvaluationResult` it returns serialises to JSON (:meth:`EvaluationResult.to_dict`)
and prints as a one-row Markdown table with class-wise lines
(:meth:`EvaluationResult.to_markdown`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from landlens.data.splits import SplitManifest
from landlens.errors import LandlensError
from landlens.features.store import FeatureSet
from landlens.retrieval.distances import Distance, distance_name, get_distance
from landlens.retrieval.metrics import (
    DEFAULT_CONFUSION_K,
    DEFAULT_PRECISION_AT,
    RetrievalScores,
    evaluate_retrieval,
)
from landlens.retrieval.protocols import Protocol, feature_set_name, resolve_protocol

if TYPE_CHECKING:
    from landlens.retrieval.rerank import Reranker

TABLE_PRECISION_AT = (5, 10, 50, 100)


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`: protocol, distance, features and scores."""

    protocol: Protocol
    distance: dict[str, Any]
    scores: RetrievalScores
    features: dict[str, Any]
    seconds: float
    rerank: dict[str, Any] | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """``{'mAP', 'ANMRR', 'P@k'...}`` as fractions."""
        return self.scores.summary()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: protocol (name, queries, database, counts), distance, features,
        metrics summary, class-wise mAP, confusion matrix, query accounting, time."""
        s = self.scores.to_dict()
        return {
            "protocol": self.protocol.to_dict(),
            "distance": self.distance,
            "features": self.features,
            "metrics": s["metrics"],
            "classwise_map": s["classwise_map"],
            "confusion": s["confusion"],
            "queries": s["queries"],
            "database_size": s["database_size"],
            "precision_at": {**s["precision_at"],
                             "definition": "relevant fraction of the first min(k, N) results, "
                                           "N = the query's database size"},
            "anmrr": {"K": "2 G(q)", "reference": "MPEG-7, Manjunath, Ohm, Vasudevan & Yamada, IEEE TCSVT 2001"},
            "ties": "stable: equal distances rank by database order",
            "evaluation_seconds": round(self.seconds, 3),
            **({"rerank": self.rerank} if self.rerank is not None else {}),
        }

    def to_markdown(self, precision_at: Sequence[int] | None = None) -> str:
        """A one-row table (percentages, ANMRR as a fraction) and one line per class.

        ``searched`` is the number of images each query ranks (its database minus itself).
        """
        m = self.metrics
        ks = [k for k in (precision_at or self.scores.precision_at) if f"P@{k}" in m]
        dataset = self.features.get("dataset") or "-"
        backbone = self.features.get("backbone") or "-"
        header = ["dataset", "backbone", "distance", "protocol", "queries", "searched", "mAP", "ANMRR",
                  *(f"P@{k}" for k in ks)]
        dist_name = str(self.distance.get("name"))
        if self.rerank is not None:
            dist_name = f"{dist_name} + {self.rerank.get('spec')}"
        row = [str(dataset), str(backbone), dist_name, self.protocol.name
               + ("" if self.protocol.name == "archive" else f" ({self.protocol.database})"),
               str(self.protocol.n_queries), str(self.protocol.to_dict()["n_database_per_query"]),
               _pct(m["mAP"]), _frac(m["ANMRR"]), *(_pct(m[f"P@{k}"]) for k in ks)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]
        cw = self.scores.classwise_map()
        if cw:
            width = max(len(c) for c in cw)
            lines.append("class-wise mAP:")
            lines += [f"  {c.ljust(width)}  {_pct(v)}" for c, v in cw.items()]
        notes = []
        if self.scores.n_skipped:
            notes.append(f"{self.scores.n_skipped} of {self.scores.n_queries} queries have no relevant image in "
                         f"their database and are left out of every mean")
        if self.scores.truncated_precision_at:
            ks_t = ", ".join(f"P@{k}" for k in self.scores.truncated_precision_at)
            notes.append(f"{ks_t}: k exceeds the database size; precision over the whole ranking")
        if self.protocol.dropped:
            notes.append(f"{len(self.protocol.dropped)} split image(s) left out as unreadable")
        if notes:
            lines.append("")
            lines += [f"note: {n}" for n in notes]
        return "\n".join(lines)


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.2f}"


def _frac(v: float) -> str:
    return "-" if v != v else f"{v:.4f}"


def describe_features(features: FeatureSet) -> dict[str, Any]:
    """What identifies a feature set in a result: dataset, backbone(s), size, fusion recipe."""
    meta = features.meta or {}
    ds = meta.get("dataset") or {}
    fusion = meta.get("fusion")
    if fusion and fusion.get("sources"):
        backbone = "+".join(str(s.get("backbone")) for s in fusion["sources"])
    else:
        backbone = (meta.get("identity") or {}).get("backbone")
    x = features.features
    return {
        "name": feature_set_name(features),
        "dataset": ds.get("name"),
        "root": ds.get("root"),
        "backbone": backbone,
        "images": len(features),
        "dim": int(x.shape[1]) if getattr(x, "ndim", 0) == 2 else None,
        "classes": list(features.classes),
        "fusion": fusion,
    }


def evaluate(
    features: FeatureSet,
    *,
    distance: str | Distance | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cosine",
    protocol: str | Protocol = "archive",
    manifest: SplitManifest | None = None,
    database: str = "archive-minus-query",
    part: str = "test",
    precision_at: Sequence[int] = DEFAULT_PRECISION_AT,
    confusion_k: int = DEFAULT_CONFUSION_K,
    block: int | None = None,
    rerank: "str | Reranker | None" = None,
) -> EvaluationResult:
    """Evaluate retrieval on ``features`` (see the module docstring).

    Args:
        features: a complete feature set (rows of unreadable images removed).
        distance: a registered distance name (``euclidean``, ``cosine``, ``manhattan``,
            ``chi2``, or one added by :func:`~landlens.retrieval.distances.register_distance`),
            a :class:`~landlens.retrieval.distances.Distance`, or a function.
        protocol: ``archive`` or ``split`` (or a resolved :class:`Protocol`).
        manifest: the split of the ``split`` protocol.
        database: ``archive-minus-query`` or ``test`` (``split`` only).
        part: the split part that queries.
        precision_at: the ``k`` of P@k.
        confusion_k: results per query counted in the confusion matrix.
        block: queries per block (default: automatic).
        rerank: an unsupervised re-ranker (:mod:`landlens.retrieval.rerank`), as a spec such
            as ``"aqe:n=2,alpha=3"`` or a :class:`~landlens.retrieval.rerank.Reranker` (refitted).
            It is fitted on the protocol's database (no labels) and ranks every query, knowing
            which database row each query is; its base similarity is the cosine, so
            ``distance`` must be ``cosine``. The result records its spec, fit time and the
            query time it adds over the plain cosine (:attr:`EvaluationResult.rerank`).

    Raises:
        LandlensError: unusable inputs: unknown protocol or distance, a manifest that does not
            match the features, no queries, an empty database, rows with NaN, negative
            features with chi2, or no query with any relevant image.
    """
    name = feature_set_name(features)
    p = protocol if isinstance(protocol, Protocol) else resolve_protocol(
        features, protocol, manifest=manifest, database=database, part=part)
    dist = get_distance(distance)
    x = np.asarray(features.features)
    if x.ndim != 2 or x.shape[0] != len(features):
        raise LandlensError(f"feature set {name}: {x.shape} features for {len(features)} images")
    x = x.astype(np.float32, copy=False)
    finite = np.ones(len(x), bool) if np.isfinite(x.sum(dtype=np.float64)) else np.isfinite(x).all(axis=1)
    if not finite.all():
        raise LandlensError(f"feature set {name} has {int((~finite).sum())} row(s) with NaN/inf "
                            f"(unreadable images?); use FeatureSet.only_valid()")
    check = getattr(dist, "check", None)
    if check is not None:
        check(x, f"feature set {name}")
    labels = np.asarray(features.labels, dtype=np.int64)
    everything = p.n_queries == len(features) and np.array_equal(p.query_indices, np.arange(len(features)))
    q = x if everything else x[p.query_indices]
    ql = labels if everything else labels[p.query_indices]
    if p.queries_are_database:
        db, dbl = q, ql
    else:
        all_db = p.n_database == len(features) and np.array_equal(p.database_indices, np.arange(len(features)))
        db = x if all_db else x[p.database_indices]
        dbl = labels if all_db else labels[p.database_indices]
    rerank_info = None
    if rerank is not None:
        dist, rerank_info = _bind_reranker(rerank, dist, p, q, db, block)
    t0 = time.perf_counter()
    if p.queries_are_database:
        scores = evaluate_retrieval(q, ql, metric=dist, precision_at=precision_at, classes=features.classes,
                                    confusion_k=confusion_k, block=block)
    else:
        scores = evaluate_retrieval(q, ql, db, dbl, metric=dist, exclude=p.exclude, precision_at=precision_at,
                                    classes=features.classes, confusion_k=confusion_k, block=block)
    seconds = time.perf_counter() - t0
    if rerank_info is not None:
        rerank_info = _rerank_timing(rerank_info, dist)
    if scores.n_scored == 0:
        raise LandlensError(f"{p.name} protocol on {name}: no query has a relevant image (same class) in its "
                            f"database, so no metric is defined")
    if rerank_info is not None:
        dist_info: dict[str, Any] = {"name": "cosine"}
    else:
        to_dict = getattr(dist, "to_dict", None)
        dist_info = to_dict() if callable(to_dict) else {"name": distance_name(dist)}
    return EvaluationResult(p, dist_info, scores, describe_features(features), seconds, rerank_info)


def _bind_reranker(rerank: Any, dist: Any, p: Protocol, q: np.ndarray, db: np.ndarray,
                   block: int | None) -> tuple[Any, dict[str, Any]]:
    """Fit the re-ranker on the protocol's database; the bound distance and what to record."""
    from landlens.retrieval.distances import Cosine
    from landlens.retrieval.metrics import auto_block
    from landlens.retrieval.rerank import Reranker, make_reranker

    if distance_name(dist) != "cosine":
        raise LandlensError(f"re-ranking ranks by cosine similarity; it cannot be combined with the "
                            f"{distance_name(dist)} distance (use cosine)")
    rr = make_reranker(rerank) if isinstance(rerank, str) else rerank
    if not isinstance(rr, Reranker):
        raise TypeError(f"rerank must be a spec or a Reranker, got {type(rr).__name__}")
    rr.fit(db)
    rows = np.asarray(p.exclude, dtype=np.int64)  # each query's own position in the database, or -1
    # the plain cosine's own cost over the same query blocks, to state what re-ranking adds
    bs = int(block) if block else auto_block(len(db))
    cos = Cosine()
    qt, dbt = torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(db))
    t0 = time.perf_counter()
    with torch.inference_mode():
        dbp = cos.prepare(dbt)
        for s in range(0, len(q), bs):
            cos.compute(cos.prepare(qt[s:s + bs]), dbp)
    base = time.perf_counter() - t0
    return rr.bind(rows), {**rr.to_dict(), "cosine_seconds": base}


def _rerank_timing(info: dict[str, Any], bound: Any) -> dict[str, Any]:
    n = max(1, int(bound.queries))
    query_ms = 1000.0 * bound.seconds / n
    cosine_ms = 1000.0 * info.pop("cosine_seconds") / n
    return {**info, "queries": int(bound.queries), "query_ms": round(query_ms, 4),
            "cosine_query_ms": round(cosine_ms, 4), "added_query_ms": round(query_ms - cosine_ms, 4),
            "timing": "per query, amortised over the evaluation's query blocks (re-ranker distances vs the "
                      "plain cosine on the same blocks); fit_seconds is paid once per database"}


__all__ = ["EvaluationResult", "describe_features", "evaluate"]
