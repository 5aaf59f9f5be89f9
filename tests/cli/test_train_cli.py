"""`landlens train ...` end to end on generated folders (offline packaged SqueezeNet weights)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fixtures.make_datasets import make_folder_dataset
from landlens.cli.main import cli

pytestmark = pytest.mark.weights("ndf")

CLASSES = ["beach", "forest", "river"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One linear run on cached features, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("train_cli")
    folder = make_folder_dataset(tmp / "scenes", CLASSES, per_class=10, size=48)
    run = tmp / "run"
    res = CliRunner().invoke(cli, [
        "train", "run", "--data", str(folder), "--backbone", "tv_squeezenet1_1", "--weights", "package",
        "--input-size", "64", "--epochs", "10", "--lr", "0.01", "--out", str(run), "--no-progress",
        "--set", "data.num_workers=0", "--set", "trainer.bootstrap=100", "--set", "data.split=60/40"])
    assert res.exit_code == 0, res.output
    return folder, run, res.output, tmp


def test_run_prints_summary_and_writes_results(trained):
    folder, run, output, _ = trained
    results = json.loads((run / "results.json").read_text())
    assert "OA " in output and "| class |" in output
    assert results["config"]["model"]["backbone"] == "tv_squeezenet1_1"
    assert results["data"]["parts"] == {"train": 18, "test": 12}
    assert results["command"].startswith("landlens")  # sys.argv under the test runner


def test_evaluate_in_dataset_matches_the_run(trained):
    folder, run, _, tmp = trained
    res = CliRunner().invoke(cli, ["train", "evaluate", str(run), str(folder), "--split", "60/40", "--json",
                                   "--workers", "0", "--out", str(tmp / "ev")])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    results = json.loads((run / "results.json").read_text())
    assert ev["n_images"] == 12 and ev["mode"] == "in-dataset"
    assert ev["report"]["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert ev["report"]["confusion"]["counts"] == results["test"]["confusion"]["counts"]
    assert (tmp / "ev" / "confusion_matrix.png").is_file()


def test_evaluate_cross_dataset_with_class_map(trained):
    folder, run, _, tmp = trained
    other = tmp / "other"
    shutil.copytree(folder / "beach", other / "Coast")
    shutil.copytree(folder / "forest", other / "woodland")
    shutil.copytree(folder / "river", other / "desert")  # not mapped: dropped
    cmap = tmp / "map.csv"
    cmap.write_text("test_class,train_class\nCoast,beach\nwoodland,forest\n")
    res = CliRunner().invoke(cli, ["train", "evaluate", str(run), str(other), "--class-map", str(cmap), "--json",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert ev["mode"] == "cross-dataset" and ev["n_images"] == 20
    assert sum(ev["report"]["confusion"]["counts"][2]) == 0  # no river images kept


def test_evaluate_missing_class_folder_is_one_line(trained):
    folder, run, _, tmp = trained
    partial = tmp / "partial"
    shutil.copytree(folder / "beach", partial / "beach")
    shutil.copytree(folder / "forest", partial / "forest")
    res = CliRunner().invoke(cli, ["train", "evaluate", str(run), str(partial), "--workers", "0"])
    assert res.exit_code == 2
    assert "river" in res.output and res.output.count("\n") == 1


def test_feature_maps_and_augment_preview(trained):
    folder, run, _, tmp = trained
    res = CliRunner().invoke(cli, ["train", "feature-maps", str(run), str(folder / "beach" / "beach_1.jpg"),
                                   "--out", str(tmp / "fm")])
    assert res.exit_code == 0, res.output
    pngs = sorted((tmp / "fm").glob("*.png"))
    assert 1 <= len(pngs) <= 4
    res = CliRunner().invoke(cli, ["train", "preview-augment", str(folder), "--preset", "geometric",
                                   "--backbone", "tv_squeezenet1_1", "--input-size", "48", "--samples", "3",
                                   "--out", str(tmp / "aug.png")])
    assert res.exit_code == 0, res.output
    w, h = Image.open(tmp / "aug.png").size
    assert w > h > 0  # 3 rows (one per class), 4 columns


def test_predict_agrees_with_the_test_predictions(trained):
    folder, run, _, _ = trained
    import csv

    rows = list(csv.DictReader((run / "test_predictions.csv").open()))
    paths = [str(folder / r["path"]) for r in rows]
    res = CliRunner().invoke(cli, ["predict", str(run), *paths, "--json", "-k", "1"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.output)
    assert [p["top"][0]["label"] for p in preds] == [r["predicted"] for r in rows]
    np.testing.assert_allclose([p["top"][0]["probability"] for p in preds],
                               [float(r["probability"]) for r in rows], atol=1e-4)


def test_rerun_into_the_same_directory_is_refused(trained):
    folder, run, _, _ = trained
    res = CliRunner().invoke(cli, ["train", "run", "--data", str(folder), "--out", str(run), "--no-progress"])
    assert res.exit_code == 2 and "already holds a run" in res.output


def test_grid_writes_one_table(trained):
    folder, _, _, tmp = trained
    res = CliRunner().invoke(cli, [
        "train", "grid", "--data", str(folder), "--backbone", "tv_squeezenet1_1", "--weights", "package",
        "--input-size", "64", "--set", "data.num_workers=0", "--set", "trainer.bootstrap=50",
        "--grid", "optim.lr=0.01,0.001", "--grid", "trainer.epochs=1,2", "--grid-out", str(tmp / "grid"),
        "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp / "grid" / "grid.json").read_text())
    assert {(r["optim.lr"], r["trainer.epochs"]) for r in rows} == {(0.01, 1), (0.01, 2), (0.001, 1), (0.001, 2)}
    assert [r["epochs_run"] for r in rows if r["trainer.epochs"] == 2] == [2, 2]
    assert "| lr |" not in res.output and "OA %" in res.output


@pytest.mark.parametrize("args, message", [
    (["--set", "data.split=[1,2]"], "data.split=[1,2]: expected text, got a list"),
    (["--set", "data.verify=maybe"], "data.verify=maybe: expected true or false"),
    (["--set", "optim.lrr=0.1"], "unknown key optim.lrr: did you mean optim.lr?"),
    (["--set", "optim.schedule=linear"], "optim.schedule=linear is not one of none, step, cosine, plateau"),
    (["--epochs", "0"], "trainer.epochs=0: expected an integer >= 1"),
])
def test_bad_config_values_are_one_line(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["train", "run", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"landlens: error: {message}") and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "r").exists()


def test_a_bad_key_in_a_config_file_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {path: /d}\nmodel: {backbone: 100000}\n")
    res = CliRunner().invoke(cli, ["train", "run", str(f)])
    assert res.exit_code == 2
    assert res.output == (f"landlens: error: {f}: model.backbone=100000: expected text "
                          "(write it in quotes to mean the text)\n")
