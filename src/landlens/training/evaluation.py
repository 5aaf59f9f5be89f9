"""Classification metrics of a scene classifier on a test set, with a bootstrap confidence interval.

:func:`classification_report` computes, from integer true and predicted labels (indices into
``classes``) and optionally per-class scores:

* overall accuracy (OA) and its percentile-bootstrap confidence interval
  (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13: resample the test
  images with replacement, recompute OA, take the ``(1-level)/2`` and ``(1+level)/2``
  percentiles of the replicates);
* per-class precision, recall, F1 and support, macro and support-weighted F1;
* Cohen's kappa (Cohen, *Educational and Psychological Measurement* 20(1), 1960, eq. 1:
  ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e`` the
  agreement expected from the row and column marginals of the confusion matrix);
* the confusion matrix (rows: true class, columns: predicted class) in counts and
  row-normalised;
* top-k accuracy (k = 1 and 5) when scores are given and there are more than k classes.

The metrics are scikit-learn's (``accuracy_score``, ``precision_recall_fscore_support``,
``cohen_kappa_score``, ``confusion_matrix``, ``top_k_accuracy_score``) and the interval is
``scipy.stats.bootstrap(method="percentile")``. Conventions: a class that is never predicted
has precision 0 (no warning), a class with no test image has recall 0, and macro/weighted
averages run over the classes that occur in the true or predicted labels (scikit-learn's
default label set); the per-class table lists every class; an undefined kappa is NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

_CHUNK_ELEMENTS = 1 << 22
"""Bootstrap index draws held in memory at once (replicates x test images)."""


def _as_labels(y: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def bootstrap_accuracy_ci(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of overall accuracy.

    ``scipy.stats.bootstrap(method="percentile")`` over the per-image hits (Efron & Tibshirani
    1993, ch. 13): each replicate draws ``n`` test images with replacement
    (``numpy.random.default_rng(seed)``, ``integers(0, n, size=(rows, n))`` for successive
    batches of ``chunk_size`` replicates) and recomputes the accuracy; the interval is the
    ``(1-level)/2`` and ``(1+level)/2`` percentiles (linear interpolation) of the ``n_boot``
    replicates. ``chunk_size`` only bounds memory (default: about 4 million draws per batch);
    the same ``seed`` and ``chunk_size`` give the same interval. A single test image gives
    the degenerate interval ``(accuracy, accuracy)`` (SciPy asks for two observations).
    """
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    n = t.size
    if n == 0:
        raise ValueError("cannot bootstrap the accuracy of an empty test set")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rows = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // n)
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    correct = (t == p).astype(np.float64)
    if n == 1:
        return float(correct[0]), float(correct[0])
    res = bootstrap((correct,), np.mean, n_resamples=n_boot, batch=rows, confidence_level=level,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


def _finite_ranks(scores: np.ndarray) -> np.ndarray:
    """``scores`` with -inf / +inf replaced by the floats just below / above every finite score.

    scikit-learn refuses infinite scores; log-probabilities of exactly 0 are -inf. The stand-ins
    keep every order and tie, so the ranking (and top-k accuracy) is unchanged.
    """
    finite = scores[np.isfinite(scores)]
    if finite.size == scores.size:
        return scores
    lo = np.nextafter(finite.min(), -np.inf) if finite.size else -1.0
    hi = np.nextafter(finite.max(), np.inf) if finite.size else 1.0
    return np.clip(scores, lo, hi)


def _top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (``scores`` ``(n, C)``).

    scikit-learn's ``top_k_accuracy_score``, which ranks ties by a stable sort, reversed: among
    equal scores the higher class index comes first. With two classes it reads the scores as
    one binary column and thresholds it, so there top-1 is counted the same way directly:
    the predicted class is the highest score, ties to the higher index.
    """
    n_classes = scores.shape[1]
    if n_classes > 2:
        return float(top_k_accuracy_score(y_true, scores, k=k, labels=np.arange(n_classes)))
    predicted = n_classes - 1 - np.argmax(scores[:, ::-1], axis=1)
    return float(accuracy_score(y_true, predicted))


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass
class ClassificationReport:
    """Metrics of one classifier on one test set (see the module docstring for definitions).

    Per-class arrays are in ``classes`` order. ``confusion[i, j]`` counts test images of class
    ``i`` predicted as class ``j``; ``confusion_normalized`` divides each row by its support
    (rows of classes with no test image stay 0). ``top_k`` maps ``k`` to top-k accuracy.
    """

    classes: list[str]
    n: int
    accuracy: float
    ci: tuple[float, float]
    ci_level: float
    n_boot: int
    seed: int
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    kappa: float
    confusion: np.ndarray
    confusion_normalized: np.ndarray
    top_k: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (fractions in [0, 1]; an undefined kappa is ``None``)."""
        return {
            "n": int(self.n),
            "accuracy": float(self.accuracy),
            "ci": {"level": float(self.ci_level), "low": float(self.ci[0]), "high": float(self.ci[1]),
                   "method": "percentile bootstrap over test images", "n_boot": int(self.n_boot),
                   "seed": int(self.seed)},
            "kappa": _nan_to_none(float(self.kappa)),
            "macro_precision": float(self.macro_precision),
            "macro_recall": float(self.macro_recall),
            "macro_f1": float(self.macro_f1),
            "weighted_f1": float(self.weighted_f1),
            "top_k": {f"top{k}": float(v) for k, v in sorted(self.top_k.items())},
            "per_class": {
                c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for c, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1,
                                         self.support, strict=True)
            },
            "confusion": {
                "classes": list(self.classes),
                "rows": "true class",
                "columns": "predicted class",
                "counts": self.confusion.astype(int).tolist(),
                "normalized": [[float(v) for v in row] for row in self.confusion_normalized],
            },
        }

    def summary_line(self) -> str:
        """``OA 97.62% (95% CI 96.9-98.3), kappa 0.975, macro F1 97.60%, n=420``."""
        lo, hi = self.ci
        kappa = "n/a" if math.isnan(self.kappa) else f"{self.kappa:.3f}"
        parts = [
            f"OA {100 * self.accuracy:.2f}% ({100 * self.ci_level:g}% CI {100 * lo:.1f}-{100 * hi:.1f})",
            f"kappa {kappa}",
            f"macro F1 {100 * self.macro_f1:.2f}%",
        ]
        parts += [f"top-{k} {100 * v:.2f}%" for k, v in sorted(self.top_k.items())]
        parts.append(f"n={self.n}")
        return ", ".join(parts)

    def to_markdown(self) -> str:
        """The summary line and a per-class table (precision, recall, F1 in %, support)."""
        lines = [self.summary_line(), "", "| class | precision | recall | F1 | support |",
                 "|---|---:|---:|---:|---:|"]
        for c, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support,
                                 strict=True):
            lines.append(f"| {c} | {100 * p:.2f} | {100 * r:.2f} | {100 * f:.2f} | {int(s)} |")
        lines.append(f"| macro avg | {100 * self.macro_precision:.2f} | {100 * self.macro_recall:.2f} "
                     f"| {100 * self.macro_f1:.2f} | {self.n} |")
        lines.append(f"| weighted F1 | | | {100 * self.weighted_f1:.2f} | {self.n} |")
        return "\n".join(lines)


def classification_report(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    *,
    probs: np.ndarray | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ClassificationReport:
    """Every classification metric of ``y_pred`` against ``y_true`` (class indices into ``classes``).

    ``probs`` (``(n, len(classes))``) are any per-class scores whose order ranks the classes
    (probabilities, log-probabilities, logits or decision values); they only feed top-k accuracy.
    ``n_boot`` replicates with ``seed`` give the ``level`` confidence interval of OA
    (:func:`bootstrap_accuracy_ci`).
    """
    classes = [str(c) for c in classes]
    n_classes = len(classes)
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("cannot evaluate an empty test set")
    if n_classes == 0:
        raise ValueError("classes is empty")
    for arr, name in ((t, "y_true"), (p, "y_pred")):
        if arr.min() < 0 or arr.max() >= n_classes:
            raise ValueError(f"{name} has labels outside 0..{n_classes - 1}")
    n = int(t.size)

    labels = np.arange(n_classes)
    cm = confusion_matrix(t, p, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    # macro and weighted averages over scikit-learn's default label set (the classes in y_true or y_pred)
    macro_precision, macro_recall, macro_f1, _ = precision_recall_fscore_support(
        t, p, average="macro", zero_division=0)
    weighted_f1 = precision_recall_fscore_support(t, p, average="weighted", zero_division=0)[2]
    accuracy = accuracy_score(t, p)
    with warnings.catch_warnings():  # kappa undefined (p_e = 1) is NaN, without a warning
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # scikit-learn >= 1.9 warns
        warnings.simplefilter("ignore", RuntimeWarning)  # older ones divide 0 by 0
        kappa = cohen_kappa_score(t, p, labels=labels)

    rows = support[:, None].astype(np.float64)
    cm_norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)

    top_k: dict[int, float] = {}
    if probs is not None:
        scores = np.asarray(probs, dtype=np.float64)
        if scores.shape != (n, n_classes):
            raise ValueError(f"probs must have shape ({n}, {n_classes}), got {scores.shape}")
        if np.isnan(scores).any():
            raise ValueError("probs holds NaN scores: top-k accuracy cannot rank the classes")
        scores = _finite_ranks(scores)
        for k in (1, 5):
            if n_classes > k:
                top_k[k] = _top_k_accuracy(t, scores, k)

    ci = bootstrap_accuracy_ci(t, p, n_boot=n_boot, level=level, seed=seed)
    return ClassificationReport(
        classes=classes, n=n, accuracy=float(accuracy), ci=ci, ci_level=level, n_boot=n_boot, seed=seed,
        precision=precision, recall=recall, f1=f1, support=support.astype(np.int64),
        macro_precision=float(macro_precision), macro_recall=float(macro_recall), macro_f1=float(macro_f1),
        weighted_f1=float(weighted_f1), kappa=float(kappa), confusion=cm.astype(np.int64),
        confusion_normalized=cm_norm, top_k=top_k,
    )


__all__ = ["ClassificationReport", "bootstrap_accuracy_ci", "classification_report"]
