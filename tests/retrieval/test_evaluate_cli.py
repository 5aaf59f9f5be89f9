"""``landlens retrieval evaluate`` end to end on a generated folder with a local checkpoint."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures.make_datasets import make_folder_dataset

from landlens.cli.retrieval import retrieval

CLASSES = ["forest", "river", "urban"]


def _root():
    """The ``landlens`` group with only this command group (errors printed as one line)."""
    from landlens.cli.common import OneLineErrorGroup

    return OneLineErrorGroup(name="landlens", commands={"retrieval": retrieval})


def _checkpoint(path, seed):
    import timm

    torch.manual_seed(seed)
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = make_folder_dataset(base / "data", CLASSES, per_class=4, ext=".png", size=32)
    return {"base": base, "data": data, "ckpt_a": _checkpoint(base / "a.pth", 3),
            "ckpt_b": _checkpoint(base / "b.pth", 4)}


def _run(args, monkeypatch):
    # the result records the exact command from sys.argv, as the installed `landlens` sees it
    monkeypatch.setattr(sys, "argv", ["landlens", *args])
    return CliRunner().invoke(_root(), args, catch_exceptions=False)


def test_archive_evaluation_writes_results_and_reuses_features(workspace, monkeypatch):
    w = workspace
    out = w["base"] / "archive.json"
    args = ["retrieval", "evaluate", str(w["data"]), "--backbone", "resnet18", "--weights", str(w["ckpt_a"]),
            "--distance", "cosine", "--protocol", "archive", "--cache-dir", str(w["base"] / "cache"),
            "--workers", "0", "--quiet", "--out", str(out)]
    res = _run(args, monkeypatch)
    assert res.exit_code == 0, res.output
    assert "extracted in" in res.output
    assert "| data | resnet18 | cosine | archive | 12 | 11 |" in res.output
    assert "class-wise mAP:" in res.output and all(c in res.output for c in CLASSES)
    doc = json.loads(out.read_text())
    assert doc["command"] == "landlens " + " ".join(args)
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["landlens"]
    (bb,) = doc["backbones"]
    assert bb["backbone"] == "resnet18" and bb["reused"] is False and bb["dim"] == 512
    assert bb["weights"]["source"] == "file" and len(bb["identity"]["weights_digest"]) == 64
    assert doc["protocol"]["name"] == "archive" and doc["protocol"]["n_queries"] == 12
    assert doc["protocol"]["n_database_per_query"] == 11
    assert doc["distance"]["name"] == "cosine"
    assert set(doc["metrics"]) == {"mAP", "ANMRR", "P@5", "P@10", "P@50", "P@100", "P@1000"}
    assert 0.0 <= doc["metrics"]["mAP"] <= 1.0
    assert set(doc["classwise_map"]) == set(CLASSES)
    cm = np.array(doc["confusion"]["matrix"])
    assert cm.shape == (3, 3) and np.allclose(cm.sum(1), 1.0)
    assert doc["confusion"]["classes"] == CLASSES
    assert doc["precision_at"]["truncated_to_database_size"] == [50, 100, 1000]
    assert doc["fusion"] is None

    # a second run takes the features from the cache: no extraction at all
    from landlens.features import cache as cache_mod

    def no_extraction(*a, **k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(cache_mod, "extract_features", no_extraction)
    out2 = w["base"] / "archive2.json"
    res2 = _run([*args[:-1], str(out2)], monkeypatch)
    assert res2.exit_code == 0, res2.output
    assert "reused" in res2.output
    doc2 = json.loads(out2.read_text())
    assert doc2["backbones"][0]["reused"] is True
    assert doc2["metrics"] == doc["metrics"]


def test_fused_backbones_with_pca_under_a_split(workspace, monkeypatch):
    from landlens.data.folder import scan_folder
    from landlens.data.splits import make_split

    w = workspace
    ds = scan_folder(w["data"])
    split = make_split(ds.paths, ds.labels, ds.classes, ratios="50/50", seed=0).save(w["base"] / "split.json")
    out = w["base"] / "fused.json"
    args = ["retrieval", "evaluate", str(w["data"]), "-b", "resnet18", "-b", "resnet18",
            "--weights", str(w["ckpt_a"]), "--weights", str(w["ckpt_b"]), "--distance", "euclidean",
            "--protocol", "split", "--split", str(split), "--database", "test", "--pca", "4",
            "--cache-dir", str(w["base"] / "cache"), "--workers", "0", "-q", "--out", str(out)]
    res = _run(args, monkeypatch)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [b["backbone"] for b in doc["backbones"]] == ["resnet18", "resnet18"]
    assert doc["backbones"][0]["identity"]["weights_digest"] != doc["backbones"][1]["identity"]["weights_digest"]
    assert doc["fusion"]["method"] == "concat-l2" and doc["fusion"]["pca_dim"] == 4
    assert len(doc["fusion"]["sources"]) == 2
    assert doc["fusion"]["fit_rows"] == 6  # PCA learned on the database: the test part
    assert doc["features"]["dim"] == 4
    assert doc["protocol"] == {**doc["protocol"], "name": "split", "database": "test", "n_queries": 6,
                               "n_database": 6, "n_database_per_query": 5}
    assert doc["split"]["seed"] == 0 and doc["split"]["sizes"] == {"train": 6, "test": 6}


@pytest.mark.parametrize("extra, message", [
    (["--protocol", "split"], "--protocol split needs --split FILE"),
    (["--database", "test"], "--database test needs --protocol split"),
    (["--weights", "auto", "--weights", "auto"], "one value for every backbone or one per --backbone"),
    (["--precision-at", "5,x"], "expected comma-separated integers"),
])
def test_user_errors_are_one_line(workspace, monkeypatch, extra, message):
    w = workspace
    args = ["retrieval", "evaluate", str(w["data"]), "-b", "resnet18", *extra, "--out", str(w["base"] / "x.json")]
    res = _run(args, monkeypatch)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("landlens: error: ") and message in lines[0]


def test_missing_split_file_is_one_line(workspace, monkeypatch):
    w = workspace
    args = ["retrieval", "evaluate", str(w["data"]), "-b", "resnet18", "--protocol", "split",
            "--split", str(w["base"] / "nope.json"), "--out", str(w["base"] / "x.json")]
    res = _run(args, monkeypatch)
    assert res.exit_code == 2 and "split manifest not found" in res.output


def test_help_lists_the_options():
    res = CliRunner().invoke(_root(), ["retrieval", "evaluate", "--help"])
    assert res.exit_code == 0
    for opt in ("--backbone", "--weights", "--distance", "--protocol", "--split", "--database", "--pca",
                "--whiten", "--cache-dir", "--out"):
        assert opt in res.output
