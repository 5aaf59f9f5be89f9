"""Search by words end to end on a generated captioned folder: the packaged MiniLM, an alignment
trained by `landlens retrieval align`, an archive answering text, text + image and feedback
queries (checked against a brute force over the projected vectors), updates that keep the text
vectors, mismatched alignments refused, zero-shot labels checked by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.make_datasets import make_folder_dataset
from fixtures.weights import require

from landlens.cli.main import cli
from landlens.models.text import MINILM_DISTRIBUTION
from landlens.retrieval.alignment import Alignment, AlignmentMismatchError
from landlens.retrieval.archive import Archive, ArchiveError

CLASSES = ["beach", "forest", "river"]
SENTENCES = {
    "beach": ["a sandy beach next to the blue sea", "waves reach the yellow sand of the beach"],
    "forest": ["a dense forest of green trees", "many tall trees cover the land"],
    "river": ["a river winds through the land", "a long curved river with water"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 3-class folder of 8 images each, its captions file, an alignment and an archive (lbp_rgb)."""
    require(MINILM_DISTRIBUTION, "transformers", why="the packaged text encoder")
    import os

    root = tmp_path_factory.mktemp("words")
    os.environ["LANDLENS_TEXT_CACHE"] = str(root / "text_cache")
    data = make_folder_dataset(root / "data" / "scenes", CLASSES, per_class=8, size=48)
    images = []
    for c in CLASSES:
        for i in range(1, 9):
            split = "train" if i <= 6 else "val" if i == 7 else "test"
            images.append({"image": f"scenes/{c}/{c}_{i}.jpg", "split": split, "sentences": SENTENCES[c]})
    captions = root / "data" / "captions.json"
    captions.write_text(json.dumps({"images": images}))
    al = root / "align.safetensors"
    res = CliRunner().invoke(cli, ["retrieval", "align", str(data), "-c", str(captions), "-b", "lbp_rgb",
                                   "--epochs", "40", "--dim", "16", "--cache-dir", str(root / "cache"), "-o", str(al)])
    assert res.exit_code == 0, res.output
    assert "text -> image" in res.output
    arch = root / "arch"
    Archive.build(data, arch, backbone="lbp_rgb", rerank=None, cache_dir=root / "cache", progress=False)
    try:
        yield {"root": root, "data": data, "captions": captions, "alignment": al, "archive": arch}
    finally:
        os.environ.pop("LANDLENS_TEXT_CACHE", None)


@pytest.fixture()
def arch(world, tmp_path: Path) -> Archive:  # noqa: ANN001
    shutil.copytree(world["archive"], tmp_path / "arch")
    a = Archive.open(tmp_path / "arch")
    a.enable_text(world["alignment"])
    return a


def _brute(arch: Archive, q: np.ndarray) -> list[int]:
    """Ids by descending cosine of q with every archive vector projected by the alignment's
    own linear head, computed here with numpy."""
    doc = json.loads((arch.directory / f"gen-{arch.generation:08d}" / "generation.json").read_text())
    al = Alignment.load(arch.directory / doc["alignment"])  # the file the archive keeps
    v = np.asarray([arch.vector(r.id) for r in arch.records()], np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    z = v @ al.image_head.weight.detach().numpy().T.astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ q
    return [arch.records()[i].id for i in np.lexsort((np.arange(len(s)), -s))]


def _text_vector(arch: Archive, sentence: str) -> np.ndarray:
    space = arch.text_space()
    t = space.tower.encode([sentence])[0].astype(np.float64)
    z = space.alignment.text_head.weight.detach().numpy().astype(np.float64) @ (t / np.linalg.norm(t))
    return z / np.linalg.norm(z)


def test_text_query_equals_a_brute_force_and_finds_the_class(arch: Archive) -> None:
    hits = arch.search_text("a sandy beach next to the sea", 5)
    want = _brute(arch, _text_vector(arch, "a sandy beach next to the sea"))
    assert [h.record.id for h in hits] == want[:5]
    assert all(h.record.class_name == "beach" for h in hits)
    assert all(abs(h.score + h.distance - 1.0) < 1e-6 for h in hits)
    forest = arch.search_text("green trees", 3, class_name="river")
    assert [h.record.class_name for h in forest] == ["river"] * 3


def test_text_plus_image_mixes_the_unit_vectors(arch: Archive) -> None:
    rec = next(r for r in arch.records() if r.class_name == "forest")
    al = arch.text_space().alignment
    iv = al.images(arch.vector(rec.id)[None])[0].astype(np.float64)
    tv = _text_vector(arch, "with water")
    q = 0.3 * iv + 0.7 * tv
    ranked = _brute(arch, q / np.linalg.norm(q))
    hits = arch.search_text("with water", 6, image=rec.id, image_weight=0.3)
    assert [h.record.id for h in hits] == [i for i in ranked if i != rec.id][:6]  # an archive id is left out
    by_file = arch.search_text("with water", 6, image=rec.path, image_weight=0.3)
    assert [h.record.id for h in by_file] == ranked[:6]  # a file is embedded again, and not left out


def test_relevance_feedback_on_text_results_is_rocchio(arch: Archive) -> None:
    tv = _text_vector(arch, "a river")
    hits = arch.search_text("a river", 4)
    good, bad = hits[0].record.id, hits[3].record.id
    space = arch.text_space()
    z = space.alignment.images(np.asarray([arch.vector(i) for i in (good, bad)]))
    q = 1.0 * tv + 0.75 * z[0] - 0.15 * z[1]
    refined = arch.search_text("a river", 5, relevant=[good], irrelevant=[bad])
    assert [h.record.id for h in refined] == _brute(arch, q / np.linalg.norm(q))[:5]
    with pytest.raises(ArchiveError, match="both relevant and not relevant"):
        arch.search_text("a river", 3, relevant=[good], irrelevant=[good])


def test_updates_keep_the_projected_vectors(arch: Archive, world) -> None:  # noqa: ANN001
    gone = [r.id for r in arch.records()[:3]]
    arch.remove(gone)
    extra = world["root"] / "extra.jpg"
    shutil.copy(world["data"] / "river" / "river_1.jpg", extra)
    from PIL import Image

    Image.open(extra).rotate(90).save(extra)
    (new,) = arch.add([extra], ["river"])
    again = Archive.open(arch.directory)
    assert again.has_text and len(again) == len(arch)
    al = again.text_space().alignment
    want = al.images(np.asarray([again.vector(r.id) for r in again.records()]))
    np.testing.assert_allclose(np.asarray(again._state.text.vectors), want, atol=1e-6)
    assert new.id in [h.record.id for h in again.search_text("a long curved river with water", len(again))]


def test_mismatched_alignments_are_refused(arch: Archive, world, tmp_path: Path) -> None:  # noqa: ANN001
    other = tmp_path / "hog.safetensors"
    res = CliRunner().invoke(cli, ["retrieval", "align", str(world["data"]), "-c", str(world["captions"]), "-b", "hog",
                                   "--epochs", "2", "--dim", "8", "--cache-dir", str(world["root"] / "cache"),
                                   "-o", str(other)])
    assert res.exit_code == 0, res.output
    with pytest.raises(AlignmentMismatchError, match="differ in backbone"):
        arch.enable_text(other)
    res = CliRunner().invoke(cli, ["index", "text", str(arch.directory), str(other)])
    assert res.exit_code == 2 and "trained on image features of hog" in res.output
    bare = Archive.open(world["archive"])
    with pytest.raises(ArchiveError, match="answers no text queries"):
        bare.search_text("a beach", 3)


def test_cli_search_text_matches_the_library(arch: Archive) -> None:
    res = CliRunner().invoke(cli, ["search", str(arch.directory), "--text", "a dense forest", "-k", "4", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [h["id"] for h in doc["results"][0]["hits"]] == _brute(arch, _text_vector(arch, "a dense forest"))[:4]
    assert doc["results"][0]["text"] == "a dense forest"
    res = CliRunner().invoke(cli, ["search", str(arch.directory), "--text", "x", "--rerank", "aqe"])
    assert res.exit_code == 2 and "do not apply to --text" in res.output


def test_zero_shot_probabilities_by_hand(world) -> None:  # noqa: ANN001
    from landlens.retrieval.textspace import open_text_space
    from landlens.training.predict import ZeroShotPredictor

    files = [world["data"] / "beach" / "beach_8.jpg", world["data"] / "forest" / "forest_8.jpg"]
    templates = ("a photo of {}.", "{} seen from above")
    pred = ZeroShotPredictor(world["alignment"], ["sandy beach", "forest", "river"], templates=templates)
    got = list(pred.iter_predictions(files, top_k=3))
    space = open_text_space(world["alignment"])
    from landlens.retrieval.textstudy import AlignedImageTower

    img, errors = AlignedImageTower(space).embed_files(files)
    assert not errors
    rows = []
    for name in ["sandy beach", "forest", "river"]:
        t = space.alignment.texts(space.tower.encode([t.format(name) for t in templates])).mean(0)
        rows.append(t / np.linalg.norm(t))
    logits = float(np.exp(space.alignment.logit_scale.item())) * img @ np.asarray(rows).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for g, row in zip(got, p):
        assert dict(zip(g.labels, g.probabilities)) == pytest.approx(dict(zip(["sandy beach", "forest", "river"], row)),
                                                                     abs=1e-5)
    tfile = world["root"] / "templates.txt"  # the same prompts: the built-in ensemble is another one
    tfile.write_text("\n".join(templates) + "\n")
    res = CliRunner().invoke(cli, ["predict", str(world["alignment"]), *map(str, files), "--zero-shot",
                                   "--classes", "sandy beach,forest,river", "--templates", str(tfile), "--json"])
    assert res.exit_code == 0, res.output
    assert [d["top"][0]["label"] for d in json.loads(res.output)] == [g.labels[0] for g in got]
    res = CliRunner().invoke(cli, ["predict", str(world["alignment"]), str(files[0]), "--zero-shot"])
    assert res.exit_code == 2 and "needs the class names" in res.output


def test_evaluate_text_cli(world, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["retrieval", "evaluate-text", str(world["alignment"]), str(world["data"]), "-c",
                                   str(world["captions"]), "--zero-shot", "--cache-dir", str(world["root"] / "cache"),
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    r = doc["retrieval"]
    assert r["images"] == 3 and r["sentences"] == 6
    # one test image per class, two sentences each that no other test image has: no ceiling
    assert r["t2i_R1_ceiling"] == pytest.approx(1.0)
    assert 0 <= r["text_to_image"]["R@1"] <= r["text_to_image"]["R@5"] <= 1
    assert doc["zero_shot"]["images"] == 24 and set(doc["zero_shot"]["per_class"]) == set(CLASSES)
