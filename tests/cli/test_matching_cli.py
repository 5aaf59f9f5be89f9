"""`landlens matching ...` end to end on a generated folder: pretrain-ae, finetune-ae, train-dml, evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fixtures.make_datasets import make_folder_dataset
from landlens.cli.matching import matching
from landlens.data.splits import SplitManifest
from landlens.matching.scoring import read_discriminator_meta
from landlens.matching.train import read_autoencoder_meta

CLASSES = ["beach", "forest", "river"]
TINY = ["--set", "data.num_workers=0", "--batch-size", "8", "--epochs", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("matching_cli")
    folder = make_folder_dataset(tmp / "scenes", CLASSES, per_class=8, size=32)
    out = {}
    cli = CliRunner()
    out["pre"] = cli.invoke(matching, ["pretrain-ae", "--data", str(folder), "--out", str(tmp / "pre"), *TINY,
                                       "--set", "ae.widths=[4,8,8]", "--set", "ae.latent_channels=8", "--no-progress"])
    # the architecture comes from --init; data.split/seed are chosen here
    out["ft"] = cli.invoke(matching, ["finetune-ae", "--init", str(tmp / "pre"), "--data", str(folder), "--split",
                                      "75/25", "--out", str(tmp / "ft"), *TINY, "--no-progress"])
    # train-dml takes the fine-tuned run's data.path, split and seed
    out["dml"] = cli.invoke(matching, ["train-dml", "--ae-run", str(tmp / "ft"), "--out", str(tmp / "dml"),
                                       "--cache-dir", str(tmp / "cache"), *TINY, "--set", "dml.width=8",
                                       "--set", "pairs.per_epoch=64", "--set", "pairs.val_pairs=32", "--no-progress"])
    out["eval"] = cli.invoke(matching, ["evaluate", str(tmp / "dml"), "--out", str(tmp / "eval.json"),
                                        "--workers", "0", "--no-progress"])
    torch.set_num_threads(before)
    return tmp, folder, out


def test_commands_run_in_sequence_and_write_their_results(runs):
    tmp, folder, out = runs
    for name, res in out.items():
        assert res.exit_code == 0, (name, res.output)
    assert "pretrain-ae: resdyad autoencoder, 64 px -> 8x8x8 latent" in out["pre"].output
    assert "22 train / 2 validation images" in out["pre"].output
    assert read_autoencoder_meta(tmp / "ft")["config"]["widths"] == [4, 8, 8]
    assert json.loads((tmp / "ft" / "results.json").read_text())["init"]["run"] == str(tmp / "pre")
    # 75/25 of 8 images per class: 6 train and 2 test per class, the same split for the discriminator
    ft_split = SplitManifest.load(tmp / "ft" / "split.json")
    assert ft_split.part("test")[0] == SplitManifest.load(tmp / "dml" / "split.json").part("test")[0]
    assert len(ft_split.part("test")[0]) == 6
    meta = read_discriminator_meta(tmp / "dml")
    assert meta["extra"]["features"]["weights_digest"] == read_autoencoder_meta(tmp / "ft")["weights_digest"]
    assert "train-dml: resdyad discriminator (width 8) on resdyad-ae features (8, 8, 8)" in out["dml"].output
    doc = json.loads((tmp / "eval.json").read_text())
    assert doc["learned"]["distance"]["name"] == "learned" and doc["baseline"]["distance"]["name"] == "euclidean"
    assert doc["learned"]["protocol"]["n_queries"] == 6 and doc["features_source"] == {"ae_run": str(tmp / "ft")}
    learned, base = doc["learned"]["metrics"]["mAP"], doc["baseline"]["metrics"]["mAP"]
    assert doc["mAP_gain"] == pytest.approx(learned - base)
    assert f"mAP {100 * learned:.2f} (learned) vs {100 * base:.2f} (euclidean)" in out["eval"].output


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    tmp, folder, _ = runs
    cli = CliRunner()
    res = cli.invoke(matching, ["evaluate", str(tmp / "nowhere"), "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert "landlens: error:" in res.output and "nowhere" in res.output
    res = cli.invoke(matching, ["pretrain-ae", "--data", str(folder), "--out", str(tmp_path / "x"),
                                "--set", "ae.depth=3"])
    assert res.exit_code == 2 and "unknown key ae.depth" in res.output and res.output.strip().count("\n") == 0
    # features of another autoencoder: the discriminator refuses them
    res = cli.invoke(matching, ["evaluate", str(tmp / "dml"), "--ae-run", str(tmp / "pre"), "--out",
                                str(tmp_path / "e.json"), "--workers", "0", "--no-progress"])
    assert res.exit_code == 2 and "weights_digest" in res.output and res.output.strip().count("\n") == 0
    # a finished run directory is not overwritten
    res = cli.invoke(matching, ["train-dml", "--ae-run", str(tmp / "ft"), "--out", str(tmp / "dml"),
                                "--cache-dir", str(tmp / "cache"), "--no-progress"])
    assert res.exit_code == 2 and "already holds a run" in res.output


@pytest.mark.weights("ndf")
def test_retrieval_evaluate_ranks_with_a_discriminator(tmp_path):
    """`retrieval evaluate --distance learned --matcher DML` on backbone features; other features are refused."""
    from landlens.cli.main import cli as landlens

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = make_folder_dataset(tmp_path / "scenes", CLASSES, per_class=8, size=32)
        cache = tmp_path / "cache"
        runner = CliRunner()
        res = runner.invoke(matching, ["train-dml", "--backbone", "tv_squeezenet1_1", "--weights", "package",
                                       "--data", str(folder), "--split", "75/25", "--out", str(tmp_path / "dml"),
                                       "--cache-dir", str(cache), *TINY, "--set", "dml.width=8",
                                       "--set", "pairs.per_epoch=64", "--set", "pairs.val_pairs=32", "--no-progress"])
        assert res.exit_code == 0, res.output
        out = tmp_path / "r.json"
        res = runner.invoke(landlens, ["retrieval", "evaluate", str(folder), "-b", "tv_squeezenet1_1", "--weights",
                                       "package", "--distance", "learned", "--matcher", str(tmp_path / "dml"),
                                       "--cache-dir", str(cache), "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert doc["distance"]["name"] == "learned"
        assert 0.0 < doc["metrics"]["mAP"] <= 1.0
        # features of another backbone do not fit the discriminator: one line, exit 2
        res = runner.invoke(landlens, ["retrieval", "evaluate", str(folder), "-b", "lbp_rgb", "--distance", "learned",
                                       "--matcher", str(tmp_path / "dml"), "--cache-dir", str(cache),
                                       "--out", str(tmp_path / "x.json"), "-q"])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("landlens: error:")]
        assert res.exit_code == 2 and len(errors) == 1 and "differ in backbone" in errors[0], res.output
        assert res.output.splitlines()[-1] == errors[0]
        assert not (tmp_path / "x.json").exists()
        res = runner.invoke(landlens, ["retrieval", "evaluate", str(folder), "-b", "lbp_rgb", "--distance", "learned",
                                       "--out", str(tmp_path / "y.json")])
        assert res.exit_code == 2 and "--matcher" in res.output
        # search: the index's 10 nearest rows re-ranked by the discriminator, in match-probability order
        store = next(p.parent for p in cache.rglob("meta.json") if "tv_squeezenet1_1" in str(p))
        assert runner.invoke(landlens, ["retrieval", "index", str(store), "--out", str(tmp_path / "idx"),
                                        "--kind", "exact"]).exit_code == 0
        query = folder / "beach" / "beach_1.jpg"
        res = runner.invoke(landlens, ["search", str(tmp_path / "idx"), str(query), "-k", "5", "--json",
                                       "--matcher", str(tmp_path / "dml"), "--shortlist", "10"])
        assert res.exit_code == 0, res.output
        hits = json.loads(res.output)["results"][0]["hits"]
        plain = json.loads(runner.invoke(landlens, ["search", str(tmp_path / "idx"), str(query), "-k", "10",
                                                    "--json"]).output)["results"][0]["hits"]
        assert {h["id"] for h in hits} <= {h["id"] for h in plain}
        from landlens.features.store import FeatureStore
        from landlens.matching.scoring import learned

        fs = FeatureStore(store).load()
        qrow = fs.paths.index("beach/beach_1.jpg")
        rows = [h["id"] for h in plain]
        d = learned(tmp_path / "dml")(torch.from_numpy(fs.features[[qrow]]), torch.from_numpy(fs.features[rows]))[0]
        expect = [rows[i] for i in torch.argsort(d, stable=True)[:5].tolist()]
        assert [h["id"] for h in hits] == expect
        assert [h["distance"] for h in hits] == pytest.approx(sorted(d.tolist())[:5], abs=1e-5)
    finally:
        torch.set_num_threads(before)


def test_bad_config_values_are_one_line(tmp_path):
    res = CliRunner().invoke(matching, ["pretrain-ae", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                        "--set", "ae.widths=[4,8]"])
    assert res.exit_code == 2
    assert res.output == "landlens: error: ae.widths=[4,8]: expected a list of 3 integers\n"
    res = CliRunner().invoke(matching, ["train-dml", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                        "--set", "model.backbone=resnet18"])
    assert res.exit_code == 2
    assert res.output == ("landlens: error: unknown section 'model': did you mean features.backbone? "
                          "(sections: data, ae, dml, features, optim, pairs, trainer, out)\n")
