"""Classification metrics against scikit-learn, and the bootstrap CI against a slow reference."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from landlens.training.evaluation import bootstrap_accuracy_ci, classification_report


def _noisy_predictions(n: int, n_classes: int, acc: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, n)
    wrong = rng.random(n) > acc
    y_pred = y_true.copy()
    y_pred[wrong] = (y_true[wrong] + rng.integers(1, n_classes, wrong.sum())) % n_classes
    return y_true, y_pred


def _slow_bootstrap(y_true, y_pred, n_boot, level, seed, chunk_size):
    """Plain-Python percentile bootstrap drawing the same indices as the library."""
    n = len(y_true)
    rng = np.random.default_rng(seed)
    accs = []
    start = 0
    while start < n_boot:
        rows = min(chunk_size, n_boot - start)
        block = rng.integers(0, n, size=(rows, n))
        for r in range(rows):
            hits = 0
            for i in block[r].tolist():
                hits += int(y_true[i] == y_pred[i])
            accs.append(hits / n)
        start += rows
    accs.sort()

    def percentile(q):  # linear interpolation between order statistics
        pos = q * (len(accs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(accs) - 1)
        return accs[lo] + (accs[hi] - accs[lo]) * (pos - lo)

    alpha = (1 - level) / 2
    return percentile(alpha), percentile(1 - alpha)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_matches_slow_reference_with_same_draws():
    y_true, y_pred = _noisy_predictions(53, 4, 0.8, seed=1)
    got = bootstrap_accuracy_ci(y_true, y_pred, n_boot=101, level=0.9, seed=7, chunk_size=13)
    want = _slow_bootstrap(y_true, y_pred, 101, 0.9, 7, 13)
    assert got == pytest.approx(want, abs=1e-12)
    # the default chunking is one block here: same as a single (n_boot, n) draw
    got_default = bootstrap_accuracy_ci(y_true, y_pred, n_boot=101, level=0.9, seed=7)
    assert got_default == pytest.approx(_slow_bootstrap(y_true, y_pred, 101, 0.9, 7, 101), abs=1e-12)


def test_bootstrap_is_deterministic_and_seed_dependent():
    y_true, y_pred = _noisy_predictions(300, 5, 0.85, seed=2)
    a = bootstrap_accuracy_ci(y_true, y_pred, seed=3)
    assert a == bootstrap_accuracy_ci(y_true, y_pred, seed=3)
    assert a != bootstrap_accuracy_ci(y_true, y_pred, seed=4)


def test_bootstrap_contains_accuracy_and_narrows_with_n():
    widths = []
    for n in (100, 1000, 10000):
        y_true, y_pred = _noisy_predictions(n, 6, 0.9, seed=n)
        acc = accuracy_score(y_true, y_pred)
        lo, hi = bootstrap_accuracy_ci(y_true, y_pred, n_boot=500, seed=0)
        assert lo <= acc <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # width scales as 1/sqrt(n): a tenfold n shrinks it about sqrt(10) = 3.16 times
    assert 2.3 < widths[0] / widths[1] < 4.3 and 2.3 < widths[1] / widths[2] < 4.3


def test_bootstrap_matches_normal_approximation_for_large_n():
    y_true, y_pred = _noisy_predictions(20000, 10, 0.9, seed=5)
    p = accuracy_score(y_true, y_pred)
    lo, hi = bootstrap_accuracy_ci(y_true, y_pred, n_boot=2000, level=0.95, seed=0)
    half = 1.959963984540054 * math.sqrt(p * (1 - p) / len(y_true))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(p, abs=0.15 * half)


def test_bootstrap_degenerate_and_bad_inputs():
    y = np.array([0, 1, 2, 1])
    assert bootstrap_accuracy_ci(y, y) == (1.0, 1.0)
    assert bootstrap_accuracy_ci(y, (y + 1) % 3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_accuracy_ci([], [])
    with pytest.raises(ValueError, match="4 labels but y_pred has 3"):
        bootstrap_accuracy_ci(y, y[:3])


# -------------------------------------------------------------------------------- report


CLASSES = ["agricultural", "beach", "forest", "harbor", "river", "runway", "urban"]


def test_report_matches_scikit_learn():
    n_classes = len(CLASSES)
    y_true, y_pred = _noisy_predictions(400, n_classes, 0.7, seed=11)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, n_classes))
    logits[np.arange(400), y_true] += 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings from the library
        rep = classification_report(y_true, y_pred, CLASSES, probs=logits, n_boot=200, seed=1)

    labels = list(range(n_classes))
    assert rep.n == 400
    assert rep.accuracy == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-15)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(rep.precision, p, atol=1e-15)
    np.testing.assert_allclose(rep.recall, r, atol=1e-15)
    np.testing.assert_allclose(rep.f1, f, atol=1e-15)
    np.testing.assert_array_equal(rep.support, s)
    assert rep.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert rep.weighted_f1 == pytest.approx(f1_score(y_true, y_pred, average="weighted"), abs=1e-12)
    mp, mr, _, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert rep.macro_precision == pytest.approx(mp, abs=1e-12)
    assert rep.macro_recall == pytest.approx(mr, abs=1e-12)
    assert rep.kappa == pytest.approx(cohen_kappa_score(y_true, y_pred), abs=1e-12)
    np.testing.assert_array_equal(rep.confusion, confusion_matrix(y_true, y_pred, labels=labels))
    np.testing.assert_allclose(rep.confusion_normalized,
                               confusion_matrix(y_true, y_pred, labels=labels, normalize="true"), atol=1e-15)
    assert set(rep.top_k) == {1, 5}
    for k in (1, 5):
        assert rep.top_k[k] == pytest.approx(top_k_accuracy_score(y_true, logits, k=k, labels=labels), abs=1e-15)
    assert rep.ci == bootstrap_accuracy_ci(y_true, y_pred, n_boot=200, seed=1)


def test_top_k_ties_rank_like_scikit_learn():
    y_true = np.array([0, 1, 2, 3, 4, 5, 0, 2])
    scores = np.zeros((8, 7))
    scores[:4, :3] = 1.0  # three-way ties at the top
    scores[4:, 5] = 2.0
    scores[6, 0] = 2.0
    rep = classification_report(y_true, scores.argmax(1), CLASSES[:7], probs=scores, n_boot=10)
    for k in (1, 5):
        assert rep.top_k[k] == pytest.approx(top_k_accuracy_score(y_true, scores, k=k, labels=range(7)))


def test_class_never_predicted_and_class_never_present():
    # class 2 is never predicted, class 3 never occurs in y_true but is predicted once,
    # class 4 occurs in neither (left out of the macro average, as scikit-learn does)
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 3, 1])
    classes = ["a", "b", "c", "d", "e"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = classification_report(y_true, y_pred, classes, n_boot=50)
    assert rep.precision[2] == 0.0 and rep.recall[2] == 0.0 and rep.f1[2] == 0.0
    assert rep.precision[3] == 0.0 and rep.recall[3] == 0.0 and rep.support[3] == 0
    assert rep.precision[1] == pytest.approx(2 / 4) and rep.recall[1] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rep.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
        assert rep.kappa == pytest.approx(cohen_kappa_score(y_true, y_pred))
    np.testing.assert_array_equal(rep.confusion_normalized[4], np.zeros(5))  # no row to normalise
    assert rep.confusion_normalized[2].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0])
    assert rep.top_k == {}


def test_hand_worked_kappa_and_top_k_skipped_for_few_classes():
    # confusion [[4, 1], [2, 3]]: p_o = 0.7, p_e = (5*6 + 5*4) / 100 = 0.5, kappa = 0.4
    y_true = np.array([0] * 5 + [1] * 5)
    y_pred = np.array([0, 0, 0, 0, 1, 0, 0, 1, 1, 1])
    probs = np.eye(2)[y_pred] * 0.8 + 0.1
    rep = classification_report(y_true, y_pred, ["x", "y"], probs=probs, n_boot=50)
    assert rep.kappa == pytest.approx(0.4)
    assert rep.accuracy == pytest.approx(0.7)
    assert rep.top_k == {1: pytest.approx(0.7)}  # no top-5 with 2 classes


def test_to_dict_is_json_and_markdown_has_the_overall_line():
    y_true, y_pred = _noisy_predictions(420, 4, 0.97, seed=3)
    rep = classification_report(y_true, y_pred, ["a", "b", "c", "d"], n_boot=300, seed=0)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["n"] == 420 and d["accuracy"] == pytest.approx(rep.accuracy)
    assert d["ci"]["low"] == rep.ci[0] and d["ci"]["level"] == 0.95 and d["ci"]["n_boot"] == 300
    assert d["per_class"]["b"]["support"] == int(rep.support[1])
    assert d["confusion"]["counts"] == rep.confusion.tolist()
    assert sum(map(sum, d["confusion"]["counts"])) == 420
    md = rep.to_markdown()
    first = md.splitlines()[0]
    lo, hi = rep.ci
    assert first.startswith(f"OA {100 * rep.accuracy:.2f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}), "
                            f"kappa {rep.kappa:.3f}, ")
    assert first.endswith("n=420")
    assert "| class | precision | recall | F1 | support |" in md
    assert f"| c | {100 * rep.precision[2]:.2f} | {100 * rep.recall[2]:.2f} |" in md


def test_undefined_kappa_is_none_in_json():
    rep = classification_report([1, 1, 1], [1, 1, 1], ["a", "b"], n_boot=10)
    assert math.isnan(rep.kappa)
    assert rep.to_dict()["kappa"] is None
    assert "kappa n/a" in rep.to_markdown()


def test_bad_inputs():
    with pytest.raises(ValueError, match="outside 0..1"):
        classification_report([0, 2], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="probs must have shape"):
        classification_report([0, 1], [0, 1], ["a", "b"], probs=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="integer class indices"):
        classification_report([0.0, 1.0], [0, 1], ["a", "b"])


def test_log_probabilities_with_minus_infinity_rank_like_the_probabilities():
    y_true, y_pred = _noisy_predictions(300, 7, 0.6, seed=21)
    rng = np.random.default_rng(1)
    probs = rng.random((300, 7))
    probs[rng.random((300, 7)) < 0.3] = 0.0  # log(0) = -inf, ties among them
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    rep = classification_report(y_true, y_pred, CLASSES, probs=logp, n_boot=10)
    for k in (1, 5):
        assert rep.top_k[k] == pytest.approx(top_k_accuracy_score(y_true, probs, k=k, labels=range(7)), abs=1e-15)
    with pytest.raises(ValueError, match="NaN scores"):
        classification_report(y_true, y_pred, CLASSES, probs=np.full((300, 7), np.nan), n_boot=10)


def test_two_class_top1_counts_ties_for_the_higher_class():
    # hand-worked: rows 2 and 3 tie, so the higher class (1) is ranked first
    y_true = np.array([0, 1, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5], [0.7, 0.3]])
    rep = classification_report(y_true, np.array([0, 1, 1, 1, 0]), ["x", "y"], probs=scores, n_boot=10)
    assert rep.top_k == {1: pytest.approx(3 / 5)}  # rows 0, 1, 3


def test_bootstrap_of_one_image_is_degenerate():
    assert bootstrap_accuracy_ci([2], [2]) == (1.0, 1.0)
    assert bootstrap_accuracy_ci([2], [1]) == (0.0, 0.0)
    rep = classification_report([0], [0], ["a", "b"], n_boot=10)
    assert rep.ci == (1.0, 1.0) and rep.accuracy == 1.0
