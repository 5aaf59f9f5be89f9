"""Classical classifiers on frozen CNN features: the "features + SVM" rows of a results table.

A baseline takes the pooled features of a pretrained backbone (extracted once per dataset
and backbone by :func:`landlens.features.cache.cached_features`), fits a scikit-learn
classifier on the training part of a split and reports the same
:class:`~landlens.training.evaluation.ClassificationReport` as fine-tuned models, so an
"off-the-shelf CNN features + linear SVM" row (Hu et al., "Transferring deep convolutional
neural networks for the scene classification of high-resolution remote sensing imagery",
*Remote Sensing* 7(11), 2015; Penatti et al., CVPRW 2015) and every transfer-learning row come
from one tool on one split.

Methods (:data:`BASELINES`):

* ``svm``: L2 normalisation, then a one-vs-rest linear SVM (``LinearSVC``, squared hinge
  loss, regularisation ``C``);
* ``logreg``: standardisation, then multinomial logistic regression (L2, ``C``, L-BFGS);
* ``knn``: L2 normalisation, then ``k`` nearest neighbours under the cosine distance
  (majority vote, uniform weights).

``C="auto"`` (the command's default) picks the regularisation from :data:`C_GRIDS` by
stratified 3-fold cross-validation on the training part alone (scikit-learn's
``GridSearchCV``), so the test part never chooses it; the chosen value and every fold score are
recorded. The best fixed C depends on the features (UC Merced train part of the 80/20 split,
5-fold CV, benchmarks/results/default_pipeline.md): for logistic regression 0.1 on the default
fusion, 0.01 and 1 tied on EfficientNet-Lite0 alone; for the SVM 1 on Lite0, 10 on all six
offline backbones.
"""

from __future__ import annotations

import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from landlens.errors import ConfigError
from landlens.training.evaluation import classification_report

BASELINES: tuple[str, ...] = ("svm", "logreg", "knn")
C_GRIDS: dict[str, tuple[float, ...]] = {"logreg": (0.01, 0.1, 1.0), "svm": (0.1, 1.0, 10.0)}
"""The regularisation values ``C="auto"`` chooses among, per method."""
CV_FOLDS = 3
SVM_MAX_ITER = 10_000
LOGREG_MAX_ITER = 5_000


def check_method(method: str) -> str:
    """``method`` lower-cased if it is one of :data:`BASELINES`, else :class:`ConfigError`."""
    m = str(method).strip().lower()
    if m not in BASELINES:
        raise ConfigError(f"unknown baseline method {method!r}; choose from {', '.join(BASELINES)}")
    return m


def _check_xy(X: np.ndarray, y: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (images, features) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if y is not None:
        y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
        if len(y) != len(X):
            raise ValueError(f"{name} has {len(X)} rows but {len(y)} labels")
    return X, y


def make_baseline(method: str, *, C: float = 1.0, k: int = 5, seed: int = 0):
    """The unfitted scikit-learn :class:`~sklearn.pipeline.Pipeline` of one baseline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    method = check_method(method)
    if method in ("svm", "logreg") and not (isinstance(C, numbers.Real) and not isinstance(C, bool) and C > 0):
        raise ConfigError(f"C={C!r}: the regularisation strength must be a number > 0")
    if method == "knn" and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ConfigError(f"k={k!r}: the number of neighbours must be an integer >= 1")
    if method == "svm":
        # L2-normalised CNN features: liblinear converges in about a second on UC Merced, where
        # standardised features took over ten minutes (badly conditioned dual problem)
        steps = [("l2", Normalizer(norm="l2")),
                 ("clf", LinearSVC(C=float(C), max_iter=SVM_MAX_ITER, random_state=seed))]
    elif method == "logreg":
        steps = [("scale", StandardScaler()),
                 ("clf", LogisticRegression(C=float(C), max_iter=LOGREG_MAX_ITER, random_state=seed))]
    else:
        steps = [("l2", Normalizer(norm="l2")),
                 ("clf", KNeighborsClassifier(n_neighbors=int(k), metric="cosine", algorithm="brute"))]
    return Pipeline(steps)


def choose_c(method: str, X_train: np.ndarray, y_train: np.ndarray, *, seed: int = 0,
             grid: Sequence[float] | None = None) -> tuple[float, dict[str, Any]]:
    """The ``C`` of ``grid`` (default :data:`C_GRIDS`) with the best mean accuracy in stratified
    :data:`CV_FOLDS`-fold cross-validation on the training images, and a record of the search.

    With fewer than two training images in some class, no fold can hold every class: the middle
    value of the grid is returned, recorded as not cross-validated.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    method = check_method(method)
    if method not in C_GRIDS:
        raise ConfigError(f"{method} has no regularisation C to choose")
    values = tuple(float(c) for c in (grid or C_GRIDS[method]))
    X_train, y_train = _check_xy(X_train, y_train, "X_train")
    smallest = int(np.unique(y_train, return_counts=True)[1].min()) if len(y_train) else 0
    folds = min(CV_FOLDS, smallest)
    if folds < 2:
        c = values[len(values) // 2]
        return c, {"chosen": c, "grid": list(values), "folds": 0, "note": "too few images per class to cross-validate"}
    search = GridSearchCV(make_baseline(method, seed=seed), {"clf__C": list(values)}, scoring="accuracy",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1, refit=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X_train, y_train)
    c = float(search.best_params_["clf__C"])
    scores = {f"{v:g}": round(float(s), 5) for v, s in zip(values, search.cv_results_["mean_test_score"])}
    return c, {"chosen": c, "grid": list(values), "folds": folds, "cv_accuracy": scores,
               "seconds": round(time.perf_counter() - t0, 2)}


def fit_baseline(method: str, X_train: np.ndarray, y_train: np.ndarray, *, C: float = 1.0, k: int = 5,
                 seed: int = 0):
    """Fit one baseline (see the module docstring) and return the fitted sklearn ``Pipeline``.

    Raises:
        ConfigError: unknown ``method``, ``C <= 0``, ``k < 1`` or more neighbours than
            training images.
    """
    X_train, y_train = _check_xy(X_train, y_train, "X_train")
    pipe = make_baseline(method, C=C, k=k, seed=seed)
    if check_method(method) == "knn" and k > len(X_train):
        raise ConfigError(f"k={k}: more neighbours than the {len(X_train)} training images")
    if len(np.unique(y_train)) < 2 and check_method(method) != "knn":
        raise ConfigError(f"{method}: the training images hold a single class; need at least two")
    return pipe.fit(X_train, y_train)


def _scores(pipe, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class scores ``(n, n_classes)`` that rank the classes (classes unseen in training: -inf)."""
    if hasattr(pipe, "predict_proba") and hasattr(pipe[-1], "predict_proba"):
        s = pipe.predict_proba(X)
    else:
        s = pipe.decision_function(X)
        if s.ndim == 1:  # binary problems give the score of classes_[1]
            s = np.stack([-s, s], axis=1)
    out = np.full((len(X), n_classes), -np.inf)
    out[:, pipe.classes_.astype(np.int64)] = s
    return out


def run_baseline(
    method: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    classes: Sequence[str],
    *,
    C: float | str = 1.0,
    k: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Fit a baseline on the training features and evaluate it on the test features.

    ``C="auto"`` chooses the regularisation on the training features (:func:`choose_c`); the
    search is recorded under ``settings["C_search"]``.

    Labels index ``classes``. Returns a JSON-ready dict: ``method``, ``settings`` (the pipeline
    and its hyper-parameters), ``n_train``, ``n_test``, ``fit_seconds``, ``predict_seconds``,
    ``warnings`` (e.g. convergence warnings raised while fitting), ``summary`` (one line) and
    ``report`` (:meth:`ClassificationReport.to_dict`, with top-1/top-5 from the classifier's
    scores).
    """
    method = check_method(method)
    X_test, y_test = _check_xy(X_test, y_test, "X_test")
    search: dict[str, Any] | None = None
    if isinstance(C, str):
        if C.strip().lower() != "auto":
            raise ConfigError(f"C={C!r}: a number > 0 or 'auto'")
        C, search = choose_c(method, X_train, y_train, seed=seed) if method in C_GRIDS else (1.0, None)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        pipe = fit_baseline(method, X_train, y_train, C=C, k=k, seed=seed)
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        y_pred = pipe.predict(X_test)
        scores = _scores(pipe, X_test, len(classes))
        predict_seconds = time.perf_counter() - t0
    for item in w:
        msg = f"{item.category.__name__}: {str(item.message).splitlines()[0]}"
        if msg not in caught:
            caught.append(msg)
    report = classification_report(y_test, y_pred, classes, probs=scores, n_boot=n_boot, seed=seed)
    clf = pipe[-1]
    settings: dict[str, Any] = {
        "pipeline": [f"{name}={type(step).__name__}" for name, step in pipe.steps],
        "seed": int(seed),
    }
    if method in ("svm", "logreg"):
        settings.update(C=float(C), max_iter=int(clf.max_iter))
        if search is not None:
            settings["C_search"] = search
    else:
        settings.update(k=int(k), metric="cosine", weights="uniform")
    return {
        "method": method,
        "settings": settings,
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "fit_seconds": round(fit_seconds, 4),
        "predict_seconds": round(predict_seconds, 4),
        "warnings": caught,
        "summary": report.summary_line(),
        "report": report.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# features of a split


@dataclass
class SplitFeatures:
    """Frozen features of the train and test parts of one split of one dataset.

    ``y_*`` index ``classes``; ``*_paths`` are the images used (relative to the class root).
    ``unreadable`` counts, per part, images of the split that could not be decoded and have no
    features. ``backbone`` records the extractor (name, weights, identity, store, reused).
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    train_paths: list[str]
    test_paths: list[str]
    manifest: Any
    split_source: dict[str, Any]
    backbone: dict[str, Any]
    dataset: Any
    unreadable: dict[str, int] = field(default_factory=dict)

    def split_record(self) -> dict[str, Any]:
        """JSON-ready description of the split (how it was made, sizes, images used)."""
        m = self.manifest
        return {
            **self.split_source,
            "kind": m.kind,
            "seed": m.seed,
            "ratios": m.ratios,
            "source_digest": m.source_digest,
            "sizes": {name: len(items) for name, items in m.parts.items()},
            "used": {"train": len(self.train_paths), "test": len(self.test_paths)},
            "unreadable": dict(self.unreadable),
        }


SplitLike = Union[str, os.PathLike, Sequence[float], Any]


def _resolve_split(split: SplitLike, ds, seed: int):
    from landlens.data.splits import SplitManifest, make_split

    if isinstance(split, SplitManifest):
        split.check_against(ds.paths, ds.labels, ds.classes)
        return split, {"source": "manifest", "path": None}
    if isinstance(split, (str, os.PathLike)):
        text = os.fspath(split)
        p = Path(text).expanduser()
        if p.is_file() or text.lower().endswith(".json"):
            manifest = SplitManifest.load(p)
            manifest.check_against(ds.paths, ds.labels, ds.classes)
            return manifest, {"source": "manifest", "path": str(p)}
    manifest = make_split(ds.paths, ds.labels, ds.classes, ratios=split, seed=seed, dataset=ds.name)
    return manifest, {"source": "ratios", "path": None,
                      "spec": split if isinstance(split, str) else list(split)}


def baseline_features(
    data_path: str | os.PathLike,
    backbone: Any = "tf_efficientnet_lite0",
    weights: str = "auto",
    split_manifest_or_ratios: SplitLike = "80/20",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> SplitFeatures:
    """Features of the train and test parts of a split, from the feature cache.

    The whole dataset's features are extracted once (or reused) with
    :func:`~landlens.features.cache.cached_features`; the split is a
    :class:`~landlens.data.splits.SplitManifest`, the path of a saved manifest (checked
    against the folder), or ratios such as ``"80/20"`` made with :func:`make_split` and
    ``seed``. In a train/val/test split the baseline is fitted on ``train`` only (``val`` is
    left unused, as it would be for model selection of a fine-tuned network).

    ``backbone`` is a registry name (built with ``weights``) or a built
    :class:`~landlens.models.registry.Backbone`.

    Raises:
        DatasetError: bad folder, split or manifest; ConfigError: a k-fold manifest.
    """
    from landlens.data.folder import scan_folder
    from landlens.features.cache import DEFAULT_CACHE_DIR, cached_store
    from landlens.models.registry import Backbone, create_backbone

    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    ds = scan_folder(data_path, dataset)
    manifest, source = _resolve_split(split_manifest_or_ratios, ds, seed)
    where = f"split {source['path']}" if source.get("path") else "the split"
    if manifest.kind != "holdout":
        raise ConfigError(f"{where} is {manifest.kind}; baselines need a hold-out split with 'train' "
                          f"and 'test' parts")
    for part in ("train", "test"):
        if part not in manifest.parts:
            raise ConfigError(f"{where} has no {part!r} part (it has {', '.join(manifest.parts)})")

    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
    fs, path, reused, seconds = cached_store(ds, bb, cache_dir=cache_dir, workers=workers, progress=progress,
                                             command=command)
    meta = fs.meta or {}
    record = {
        "backbone": bb.name,
        "weights_option": None if isinstance(backbone, Backbone) else weights,
        "weights": (meta.get("backbone") or {}).get("weights", bb.weights.to_dict()),
        "identity": meta.get("identity"),
        "describe": meta.get("backbone"),
        "store": str(path),
        "reused": bool(reused),
        "extract_seconds": None if reused else round(seconds, 3),
        "images": len(fs),
        "dim": int(fs.features.shape[1]),
        "unreadable": len(meta.get("failures", [])),
    }

    row_of = {p: i for i, p in enumerate(fs.paths)}
    out: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    unreadable: dict[str, int] = {}
    for part in ("train", "test"):
        paths, _ = manifest.part(part)
        kept = [p for p in paths if p in row_of]
        unreadable[part] = len(paths) - len(kept)
        rows = np.array([row_of[p] for p in kept], dtype=np.int64)
        out[part] = (np.asarray(fs.features[rows], dtype=np.float32), fs.labels[rows].astype(np.int64), kept)
    return SplitFeatures(
        X_train=out["train"][0], y_train=out["train"][1], X_test=out["test"][0], y_test=out["test"][1],
        classes=list(ds.classes), train_paths=out["train"][2], test_paths=out["test"][2],
        manifest=manifest, split_source=source, backbone=record, dataset=ds, unreadable=unreadable,
    )


__all__ = [
    "BASELINES",
    "SplitFeatures",
    "baseline_features",
    "C_GRIDS",
    "check_method",
    "choose_c",
    "fit_baseline",
    "make_baseline",
    "run_baseline",
]
