"""benchmarks/matching_study.py in --smoke mode: Table II on a generated dataset, checked against
scikit-learn average precision computed independently from the cached features and the saved discriminator."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from landlens.data.splits import SplitManifest
from landlens.features.cache import cached_features
from landlens.matching.scoring import load_discriminator

REPO = Path(__file__).resolve().parents[2]


def _load_study():
    spec = importlib.util.spec_from_file_location("matching_study", REPO / "benchmarks" / "matching_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    before = torch.get_num_threads()
    work = tmp_path_factory.mktemp("study")
    study = _load_study()
    argv = ["--smoke", "--table2", "--features", "hog", "lbp_rgb", "--work", str(work)]
    try:
        assert study.main(argv) == 0
        first = json.loads((work / "results" / "matching_study.json").read_text())
        assert study.main(argv) == 0  # everything reused: runs and evaluations
        second = json.loads((work / "results" / "matching_study.json").read_text())
    finally:
        torch.set_num_threads(before)
    return {"work": work, "first": first, "second": second}


def _mean_ap(dist: np.ndarray, labels: np.ndarray) -> float:
    """mAP of every row querying the others (itself excluded), with scikit-learn's average precision."""
    aps = []
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        relevant = labels[keep] == labels[i]
        if relevant.any():
            aps.append(average_precision_score(relevant, -dist[i, keep]))
    return float(np.mean(aps))


def test_outputs_hold_the_table2_rows(smoke):
    work, doc = smoke["work"], smoke["first"]
    md = (work / "results" / "matching_study.md").read_text()
    rows = doc["stages"]["table2"]["rows"]
    assert [r["label"] for r in rows] == ["HoG", "LBP-RGB"]
    for label in ("HoG", "LBP-RGB"):
        assert f"| {label} | Euclidean |" in md and f"| {label} | learned |" in md
    assert "## Table II" in md and "## Table I:" not in md and "CPU-sized" in md
    # no autoencoder ran, so no AE row, and the report says why
    assert any("no AE row" in n for n in doc["stages"]["table2"]["notes"])
    assert "no AE row" in md
    # 4 classes x 10 images, 80/20: 8 test queries, each searching the other 7 test images
    for r in rows:
        assert r["learned"]["queries"] == 8 and r["learned"]["searched"] == 7
        assert set(r["learned"]["metrics"]) >= {"mAP", "ANMRR", "P@5", "P@10", "P@50", "P@100"}
    s = doc["meta"]["settings"]
    assert s["smoke"] and s["database"] == "test" and s["ae_widths"] == [4, 8, 8]
    figures = work / "results" / "matching_study_figures"
    assert (figures / "classwise_map.png").is_file() and (figures / "retrieval_confusion.png").is_file()
    assert set(doc["figures"]) >= {"classwise_map.png", "retrieval_confusion.png",
                                   "table2_best_dml_learning_curves.png"}


def test_second_call_reuses_every_run(smoke):
    first, second = smoke["first"], smoke["second"]
    names = {"dml-feat-hog-resdyad-r80-20", "dml-feat-lbp_rgb-resdyad-r80-20"}
    assert names <= set(first["runs"]) and not any(first["runs"][n]["reused"] for n in names)
    assert all(second["runs"][n]["reused"] for n in names)
    a, b = first["stages"]["table2"]["rows"], second["stages"]["table2"]["rows"]
    assert [r["learned"]["metrics"] for r in a] == [r["learned"]["metrics"] for r in b]


@pytest.mark.parametrize("feature", ["hog", "lbp_rgb"])
def test_metrics_match_an_independent_computation(smoke, feature):
    work, doc = smoke["work"], smoke["first"]
    row = next(r for r in doc["stages"]["table2"]["rows"] if r["feature"] == feature)
    run = REPO / row["run"]  # relative to the repository, or absolute
    fs = cached_features(work / "data" / "scenes", None, feature, "auto", cache_dir=work / "cache", progress=False)
    split = SplitManifest.load(run / "split.json")
    test_paths, _ = split.part("test")
    assert len(test_paths) == 8
    pos = {p: i for i, p in enumerate(fs.paths)}
    idx = np.array([pos[p] for p in test_paths])
    x = np.asarray(fs.features, dtype=np.float64)[idx]
    labels = np.asarray(fs.labels)[idx]
    # Euclidean, database = the test part
    euclid = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    assert row["baseline"]["metrics"]["mAP"] == pytest.approx(_mean_ap(euclid, labels), abs=1e-6)
    # learned: 1 - P(match) of the saved discriminator, run pair by pair through its plain forward
    net = load_discriminator(run).eval()
    xt = torch.from_numpy(x.astype(np.float32))
    with torch.inference_mode():
        n = len(xt)
        a = xt.repeat_interleave(n, 0)
        b = xt.repeat(n, 1)
        p = torch.softmax(net(a, b).double(), dim=1)[:, 1].reshape(n, n).numpy()
    assert row["learned"]["metrics"]["mAP"] == pytest.approx(_mean_ap(1.0 - p, labels), abs=1e-5)
