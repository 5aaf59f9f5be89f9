"""`landlens retrieval index` and `landlens search` on an archive of generated scenes and a tiny
seeded ResNet-18 checkpoint (so the search command can rebuild the extractor from the archive)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from landlens.cli.main import cli
from landlens.cli.search import index_cmd, search_cmd
from landlens.data.folder import scan_folder
from landlens.features.extract import extract_features
from landlens.models.registry import create_backbone
from landlens.retrieval.gallery import gallery_size
from landlens.retrieval.archive import Archive

CLASSES = ("forest", "river", "urban")
PER_CLASS = 4


def _image(ci: int, i: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(100 * ci + i)
    base = np.zeros((size, size, 3), np.uint8)
    base[..., ci % 3] = 170
    if ci == 2:
        base[::4] = 255  # stripes
    return np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(root, checkpoint path, feature store, archive folder) built once for the module."""
    tmp = tmp_path_factory.mktemp("search_cli")
    root = tmp / "archive"
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(_image(ci, i)).save(root / c / f"{c}_{i}.png")
    torch.manual_seed(7)  # not the seed of the loader's random-init check
    ckpt = tmp / "resnet18_seeded.pth"
    torch.save(create_backbone("resnet18", "none").body.state_dict(), ckpt)
    bb = create_backbone("resnet18", str(ckpt))
    bb.preprocessing = bb.preprocessing.replace(input_size=32, resize_mode="squash")
    ds = scan_folder(root)
    store = tmp / "store"
    extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, store, workers=0, progress=False,
                     optimize="none")
    idx = tmp / "index"
    res = CliRunner().invoke(index_cmd, [str(store), "--out", str(idx), "--kind", "exact"])
    assert res.exit_code == 0, res.output
    assert "12 x 512 resnet18 features, Flat (exact), cosine" in res.stdout, res.output
    return root, ckpt, store, idx


def _search(args):
    return CliRunner().invoke(search_cmd, [str(a) for a in args])


def test_archive_records_the_store_identity(archive):
    root, ckpt, _, idx = archive
    arch = Archive.open(idx)
    assert len(arch) == 12 and arch.dim == 512 and arch.classes == list(CLASSES)
    meta = arch.index.meta
    assert meta["backbone"]["weights"]["source"] == "file"
    assert meta["backbone"]["weights"]["ref"] == str(ckpt.resolve())
    assert meta["identity"]["preprocessing"]["input_size"] == 32
    assert {r.path for r in arch.records()} == {str(p) for p in root.rglob("*.png")}


def test_archive_query_is_found_first_with_a_gallery(archive, tmp_path):
    root, _, _, idx = archive
    gallery = tmp_path / "g.png"
    res = _search([idx, root / "river" / "river_2.png", "--k", "5", "--json", "--gallery", gallery])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (q,) = doc["results"]
    assert q["query_class"] == "river" and q["query_id"] is not None
    top = q["hits"][0]
    assert top["rank"] == 1 and top["id"] == q["query_id"] and top["name"] == "river_2.png"
    assert abs(top["distance"]) < 1e-4 and top["path"] == str(root / "river" / "river_2.png")
    assert top["class"] == "river" and top["relevant"] is True
    assert [h["rank"] for h in q["hits"]] == [1, 2, 3, 4, 5]
    assert all(h["relevant"] == (h["class"] == "river") for h in q["hits"])
    with Image.open(gallery) as im:
        assert im.format == "PNG" and im.size == gallery_size(1, 5)


def test_search_equals_brute_force_cosine(archive):
    """The archive's answer to a query file is the numpy cosine ranking of the store's features."""
    from landlens.features.store import FeatureStore

    root, _, store, idx = archive
    fs = FeatureStore(store).load()
    db = np.asarray(fs.features, np.float64)
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    row = list(fs.paths).index("forest/forest_3.png")
    want = [fs.paths[i] for i in np.argsort(-(dbn @ dbn[row]), kind="stable")[:6]]
    res = _search([idx, root / "forest" / "forest_3.png", "--k", "6", "--json"])
    hits = json.loads(res.stdout)["results"][0]["hits"]
    assert [str(Path(h["path"]).relative_to(root)) for h in hits] == want
    # the Python API gives the same hits by path, by id (itself left out) and by vector
    arch = Archive.open(idx)
    by_path = arch.search(root / "forest" / "forest_3.png", k=6)
    assert [h.record.id for h in by_path] == [h["id"] for h in hits]
    by_id = arch.search(hits[0]["id"], k=5)
    assert [h.record.id for h in by_id] == [h["id"] for h in hits[1:]]
    by_vec = arch.search(arch.vector(hits[0]["id"]), k=6)
    assert [h.record.id for h in by_vec] == [h["id"] for h in hits]
    only = arch.search(hits[0]["id"], k=3, class_name="urban")
    assert [h.record.class_name for h in only] == ["urban"] * 3


def test_several_queries_make_a_grid_and_a_table(archive, tmp_path):
    root, _, _, idx = archive
    outside = tmp_path / "new_forest.png"
    Image.fromarray(_image(0, 99)).save(outside)
    gallery = tmp_path / "grid.png"
    res = _search([idx, root / "urban" / "urban_0.png", outside, "--k", "3", "--gallery", gallery,
                   "--query-class", "urban", "--query-class", "forest"])
    assert res.exit_code == 0, res.output
    assert "| rank | distance | class | name | id |" in res.stdout
    assert "| 1 | 0.0000 | urban + | urban_0.png |" in res.stdout
    assert "(class: forest)" in res.stdout
    with Image.open(gallery) as im:
        assert im.size == gallery_size(2, 3)


def test_query_that_is_not_an_image_fails_in_one_line_and_writes_nothing(archive, tmp_path):
    _, _, _, idx = archive
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    gallery = tmp_path / "g.png"
    res = _search([idx, bad, "--gallery", gallery])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("landlens: error: ") and str(bad) in lines[0]
    assert not gallery.exists() and list(tmp_path.iterdir()) == [bad]
    missing = _search([idx, tmp_path / "nope.jpg"])
    assert missing.exit_code == 2 and "nope.jpg" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_k_larger_than_the_archive_is_refused(archive):
    root, _, _, idx = archive
    res = _search([idx, root / "forest" / "forest_0.png", "--k", "50"])
    assert res.exit_code == 2 and "k=50 is larger than the archive (12 images)" in res.stderr


def _forge(idx, tmp_path, name, change):
    forged = tmp_path / name
    shutil.copytree(idx, forged)
    meta_file = next(forged.glob("segments/seg-*/index/index.json"))
    doc = json.loads(meta_file.read_text())
    change(doc["meta"])
    meta_file.write_text(json.dumps(doc))
    return forged


def test_archive_with_another_weights_digest_is_refused(archive, tmp_path):
    root, _, _, idx = archive
    forged = _forge(idx, tmp_path, "forged", lambda m: m["identity"].update(weights_digest="0" * 64))
    gallery = tmp_path / "g.png"
    res = _search([forged, root / "forest" / "forest_0.png", "--gallery", gallery])
    assert res.exit_code == 2
    msg = res.stderr.strip()
    assert len(msg.splitlines()) == 1
    assert "index was built with resnet18" in msg and "weights digest 0000000000000000" in msg
    assert "this backbone gives resnet18" in msg and not gallery.exists()


def test_random_weights_cannot_be_rebuilt(archive, tmp_path):
    root, _, _, idx = archive
    forged = _forge(idx, tmp_path, "random", lambda m: m["backbone"].update(
        weights={"source": "none", "ref": "random-init", "digest": None}))
    res = _search([forged, root / "forest" / "forest_0.png"])
    assert res.exit_code == 2 and "cannot be rebuilt" in res.stderr


def test_unknown_query_class_is_refused(archive):
    root, _, _, idx = archive
    res = _search([idx, root / "forest" / "forest_0.png", "--query-class", "desert"])
    assert res.exit_code == 2 and "'desert' is not a class of this archive" in res.stderr


def test_existing_archive_needs_overwrite(archive):
    _, _, store, idx = archive
    res = CliRunner().invoke(index_cmd, [str(store), "--out", str(idx)])
    assert res.exit_code == 2 and "already holds an archive" in res.stderr


def test_an_old_row_index_gets_one_line_saying_what_to_do(archive, tmp_path):
    root, _, _, _ = archive
    old = tmp_path / "old.index"
    old.mkdir()
    (old / "index.json").write_text("{}")
    (old / "index.faiss").write_bytes(b"")
    res = _search([old, root / "forest" / "forest_0.png"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "landlens 0.1" in res.stderr and "landlens retrieval index STORE" in res.stderr


def test_commands_work_through_the_landlens_group(archive, tmp_path):
    root, _, store, _ = archive
    out = tmp_path / "ivf"
    res = CliRunner().invoke(cli, ["retrieval", "index", str(store), "--out", str(out), "--kind", "IVF2,Flat",
                                   "--metric", "euclidean", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["index"]["factory"] == "IVF2,Flat" and doc["index"]["metric"] == "euclidean" and doc["images"] == 12
    res = CliRunner().invoke(cli, ["search", str(out), str(root / "urban" / "urban_3.png"), "--k", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"][0]["hits"][0]["name"] == "urban_3.png"
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    res = CliRunner().invoke(cli, ["search", str(out), str(bad)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and str(bad) in res.stderr
    # a store's vectors are searched as they are, unless --rerank records a default (auto: as index build)
    assert doc["rerank"] is None
    res = CliRunner().invoke(cli, ["retrieval", "index", str(store), "--out", str(tmp_path / "ranked"), "--rerank",
                                   "auto", "--json"])
    assert res.exit_code == 0, res.output
    from landlens.retrieval.rerank import DEFAULT_RERANK

    assert json.loads(res.stdout)["rerank"] == DEFAULT_RERANK


def test_rerank_option_ranks_by_query_expansion(archive):
    """--rerank aqe:n=2,alpha=0 equals an independent numpy reference over the store's features
    (two neighbours, not one: with one, the query and its neighbour tie exactly)."""
    from landlens.features.store import FeatureStore

    root, _, store, idx = archive
    fs = FeatureStore(store).load()
    db = np.asarray(fs.features, np.float64)
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    row = list(fs.paths).index("urban/urban_1.png")
    s = dbn @ dbn[row]
    s[row] = -np.inf
    qe = dbn[row] + dbn[np.argsort(-s, kind="stable")[:2]].sum(axis=0)
    want = [fs.paths[i] for i in np.argsort(-(dbn @ (qe / np.linalg.norm(qe))), kind="stable")[:6]]
    res = _search([idx, root / "urban" / "urban_1.png", "--k", "6", "--json", "--rerank", "aqe:n=2,alpha=0"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["rerank"] == "aqe:n=2,alpha=0"
    assert [str(Path(h["path"]).relative_to(root)) for h in doc["results"][0]["hits"]] == want


def test_rerank_option_refuses_bad_specs_and_the_matcher(archive, tmp_path):
    root, _, _, idx = archive
    q = root / "urban" / "urban_1.png"
    res = _search([idx, q, "--rerank", "aqe:n=zero"])
    assert res.exit_code == 2 and "aqe" in res.output and "Traceback" not in res.output
    res = _search([idx, q, "--rerank", "aqe", "--matcher", tmp_path])
    assert res.exit_code == 2 and "cannot be combined" in res.output


def test_retrieval_evaluate_takes_an_archive(archive, tmp_path):
    """An archive is evaluated as indexed: the same scores as its feature store's features."""
    from landlens.features.store import FeatureStore
    from landlens.retrieval.evaluate import evaluate

    _, _, store, idx = archive
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["retrieval", "evaluate", str(idx), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    want = evaluate(FeatureStore(store).load().only_valid()).metrics
    assert doc["metrics"]["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    assert doc["data"]["images"] == 12 and doc["backbones"][0]["backbone"] == "resnet18"
    res = CliRunner().invoke(cli, ["retrieval", "evaluate", str(idx), "-b", "lbp_rgb", "--out", str(out)])
    assert res.exit_code == 2 and "drop --backbone" in res.output
