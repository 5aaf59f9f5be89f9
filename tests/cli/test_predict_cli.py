"""`landlens predict` and `landlens export`: text, JSON and CSV output, bad images, exit codes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures.make_datasets import class_image, make_bad_files, write_image

from landlens.cli.predict import export_cmd, predict_cmd
from landlens.data.io import load_rgb
from landlens.models.classifier import HeadConfig, build_classifier, load_classifier, save_classifier
from landlens.models.preprocessing import Preprocessing, preprocess_images

CLASSES = ["desert", "forest", "lake", "urban"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = build_classifier("resnet10t", CLASSES, HeadConfig("linear"), weights="none",
                             preprocessing=Preprocessing(input_size=48))
    with torch.no_grad():
        model.head.fc.weight.mul_(20.0)
    d = tmp_path_factory.mktemp("cli_run")
    save_classifier(model, d)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli_images")
    for i, name in enumerate(["b/x1.png", "a10.jpg", "a2.jpg"]):
        write_image(d / name, class_image(i, i, (40, 36)))
    return d


def _expected(run_dir: Path, paths: list[Path]) -> np.ndarray:
    model = load_classifier(run_dir)
    with torch.no_grad():
        x = preprocess_images([load_rgb(p) for p in paths], model.preprocessing)
        return model(x).double().exp().numpy()


def _order(folder: Path) -> list[Path]:
    return [folder / "a2.jpg", folder / "a10.jpg", folder / "b/x1.png"]


def test_text_output(run_dir: Path, folder: Path) -> None:
    res = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder), "--top-k", "2"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    paths = _order(folder)
    probs = _expected(run_dir, paths)
    assert len(lines) == 3
    for line, p, row in zip(lines, paths, probs):
        fields = line.split("  ")
        assert fields[0] == str(p)
        order = np.argsort(-row, kind="stable")[:2]
        assert fields[1:] == [f"{CLASSES[j]} {row[j]:.3f}" for j in order]


def test_json_output(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder), "--json", "-k", "3"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    paths = _order(folder)
    probs = _expected(run_dir, paths)
    assert [d["path"] for d in data] == [str(p) for p in paths]
    for d, row in zip(data, probs):
        assert d["error"] is None and [t["rank"] for t in d["top"]] == [1, 2, 3]
        for t in d["top"]:
            assert t["probability"] == pytest.approx(row[CLASSES.index(t["label"])], abs=1e-6)
        assert d["top"][0]["label"] == CLASSES[int(row.argmax())]
    out = tmp_path / "pred.json"
    res = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder), "--json", "-k", "3", "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text()) == data


def test_csv_output(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder / "a2.jpg"), "--csv", "-k", "4",
                                           "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["path", "rank", "label", "probability"]
    assert [r[1] for r in rows[1:]] == ["1", "2", "3", "4"]
    row = _expected(run_dir, [folder / "a2.jpg"])[0]
    assert sorted(r[2] for r in rows[1:]) == sorted(CLASSES)
    for r in rows[1:]:
        assert r[0] == str(folder / "a2.jpg")
        assert float(r[3]) == pytest.approx(row[CLASSES.index(r[2])], rel=1e-5)
    stdout = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder / "a2.jpg"), "--csv", "-k", "4"]).stdout
    assert stdout == out.read_text()


def test_bad_image_reported_and_exit_1(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    bad = make_bad_files(tmp_path / "bad")["corrupt"]
    res = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder / "a2.jpg"), str(bad),
                                           str(folder / "a10.jpg"), "--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert [d["error"] is None for d in data] == [True, False, True]
    assert [len(d["top"]) for d in data] == [4, 0, 4]  # default top-k 5 clipped to the 4 classes
    assert str(bad) in res.stderr and "landlens: error:" in res.stderr
    res = CliRunner().invoke(predict_cmd, [str(run_dir), str(folder / "a2.jpg"), str(bad)])
    assert res.exit_code == 1
    assert res.stdout.startswith(str(folder / "a2.jpg")) and len(res.stdout.strip().splitlines()) == 1


def test_user_errors_are_one_line(run_dir: Path, folder: Path, tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path), str(folder)], "model.json"),
        ([str(run_dir), str(tmp_path / "missing.jpg")], "missing.jpg"),
        ([str(run_dir), str(folder), "-k", "9"], "4 classes"),
        ([str(run_dir), str(folder), "--json", "--csv"], "--json or --csv"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(predict_cmd, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.count("\n") == 1 and needle in res.stderr and res.stdout == ""
    res = CliRunner().invoke(export_cmd, [str(tmp_path), "--format", "onnx"])
    assert res.exit_code == 2 and "model.json" in res.stderr and res.stderr.count("\n") == 1


def test_export_command(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "net.onnx"
    res = CliRunner().invoke(export_cmd, [str(run_dir), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == str(out) and out.is_file()
    assert lines[1].startswith("parity: ") and "limit 0.0001" in lines[1]
    res = CliRunner().invoke(export_cmd, [str(run_dir), "--format", "torchscript", "--out", str(tmp_path),
                                          "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["path"] == str(tmp_path / "model.torchscript.pt") and info["max_abs_diff"] < 1e-4
