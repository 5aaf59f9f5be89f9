"""Image-text alignment: InfoNCE against a hand-computed value, R@k against a brute force, the
captions reader's errors, and heads that learn a planted pairing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from landlens.errors import CheckpointError
from landlens.retrieval.alignment import Alignment, AlignmentMismatchError, info_nce, recall_at_k
from landlens.retrieval.textspace import readable_class_name


def test_info_nce_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(0.0)  # exp(0) = 1: logits are the cosines
    # image->text rows: [1, 0.6] (target 0), [0, 0.8] (target 1); text->image rows: [1, 0], [0.6, 0.8]
    ce = lambda row, t: -row[t] + math.log(sum(math.exp(v) for v in row))  # noqa: E731
    want = (ce([1, 0.6], 0) + ce([0, 0.8], 1) + ce([1, 0], 0) + ce([0.6, 0.8], 1)) / 4
    assert float(info_nce(img, txt, scale)) == pytest.approx(want, abs=1e-6)


def test_recall_at_k_equals_a_brute_force() -> None:
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(40, 25))
    relevant = [set(rng.choice(25, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    got = recall_at_k(sim, relevant, ks=(1, 3, 10))
    for k in (1, 3, 10):
        hits = 0
        for q in range(40):
            best = sorted(range(25), key=lambda j: -sim[q, j])[:k]
            hits += any(j in relevant[q] for j in best)
        assert got[f"R@{k}"] == pytest.approx(hits / 40)


def test_heads_learn_a_planted_pairing() -> None:
    """Image and text features are two random rotations of the same 16 class codes plus noise:
    trained heads must retrieve each caption's own class far above chance (1/16)."""
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(16, 8))
    ri, rt = np.linalg.qr(rng.normal(size=(24, 24)))[0][:8], np.linalg.qr(rng.normal(size=(12, 12)))[0][:8]
    img_class = np.repeat(np.arange(16), 10)
    images = codes[img_class] @ ri + 0.05 * rng.normal(size=(160, 24))
    owner = np.repeat(np.arange(160), 2)
    texts = codes[img_class[owner]] @ rt + 0.05 * rng.normal(size=(320, 12))
    model = Alignment(24, 12, dim=16, temperature=0.1)
    losses = model.fit(images, texts, owner, epochs=40, batch_size=32, lr=1e-2, seed=0)
    assert losses[-1] < losses[0]
    sim = model.texts(texts) @ model.images(images).T
    same_class = [set(np.flatnonzero(img_class == img_class[o]).tolist()) for o in owner]
    assert recall_at_k(sim, same_class, ks=(1,))["R@1"] > 0.9


def test_mlp_heads_learn_it_too() -> None:
    rng = np.random.default_rng(2)
    codes = rng.normal(size=(8, 6))
    img_class = np.repeat(np.arange(8), 12)
    images = codes[img_class] @ rng.normal(size=(6, 20)) + 0.05 * rng.normal(size=(96, 20))
    owner = np.arange(96)
    texts = codes[img_class] @ rng.normal(size=(6, 10)) + 0.05 * rng.normal(size=(96, 10))
    model = Alignment(20, 10, dim=8, head="mlp", hidden=32, temperature=0.1)
    model.fit(images, texts, owner, epochs=60, batch_size=16, lr=1e-2, seed=0)
    sim = model.texts(texts) @ model.images(images).T
    same_class = [set(np.flatnonzero(img_class == img_class[o]).tolist()) for o in owner]
    assert recall_at_k(sim, same_class, ks=(1,))["R@1"] > 0.9


def _planted_model() -> Alignment:
    torch.manual_seed(0)
    return Alignment(6, 4, dim=3, temperature=0.05,
                     image_tower={"backbone": "tf_efficientnet_lite0", "weights_digest": "ab" * 32, "dim": 6,
                                  "extractors": [{"backbone": "tf_efficientnet_lite0"}]},
                     text_tower={"name": "all-MiniLM-L6-v2", "digest": "cd" * 32, "dim": 4, "pooling": "mean"})


def test_alignment_file_round_trip_and_identity_checks(tmp_path: Path) -> None:
    model = _planted_model()
    model.trained = {"epochs": 3}
    path = model.save(tmp_path / "a.safetensors")
    back = Alignment.load(path)
    x, t = np.random.default_rng(0).normal(size=(5, 6)), np.random.default_rng(1).normal(size=(5, 4))
    np.testing.assert_allclose(back.images(x), model.images(x), atol=1e-7)
    np.testing.assert_allclose(back.texts(t), model.texts(t), atol=1e-7)
    assert back.trained == {"epochs": 3} and back.image_tower == model.image_tower
    # by hand: a linear head without bias on the unit input, renormalised
    w = model.image_head.weight.detach().numpy()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = u @ w.T
    np.testing.assert_allclose(back.images(x), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    back.check_images({"backbone": "tf_efficientnet_lite0", "weights_digest": "ab" * 32, "dim": 6})
    with pytest.raises(AlignmentMismatchError, match="differ in weights_digest"):
        back.check_images({"backbone": "tf_efficientnet_lite0", "weights_digest": "ef" * 32, "dim": 6})
    with pytest.raises(AlignmentMismatchError, match="differ in backbone, dim"):
        back.check_images({"backbone": "tv_mobilenet_v2", "dim": 1280})
    back.check_text({"name": "all-MiniLM-L6-v2", "digest": "cd" * 32, "dim": 4, "pooling": "mean", "ref": "x"})
    with pytest.raises(AlignmentMismatchError, match="text tower"):
        back.check_text({"name": "all-MiniLM-L6-v2", "digest": "00" * 32, "dim": 4})
    with pytest.raises(AlignmentMismatchError, match="do not fit"):
        back.images(np.zeros((2, 7)))


def test_alignment_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Alignment.load(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Alignment.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a landlens alignment file"):
        Alignment.load(tmp_path / "other.safetensors")


def test_identity_alignment_only_normalises() -> None:
    model = Alignment(4, 4, dim=4, head="identity")
    x = np.array([[3.0, 0, 4, 0]])
    np.testing.assert_allclose(model.images(x), [[0.6, 0, 0.8, 0]], atol=1e-7)


@pytest.mark.parametrize(("name", "vocab", "want"), [
    ("HerbaceousVegetation", None, "herbaceous vegetation"),
    ("parking_lot", None, "parking lot"),
    ("SeaLake", None, "sea lake"),
    ("denseresidential", {"dense", "residential", "den", "ser"}, "dense residential"),
    ("mobilehomepark", {"mobile", "home", "park", "mob"}, "mobile home park"),
    ("chaparral", {"chap", "dense"}, "chaparral"),  # no complete split: kept whole
    ("forest", {"for", "est", "forest"}, "forest"),  # a known word is never split
])
def test_readable_class_names(name: str, vocab: set[str] | None, want: str) -> None:
    assert readable_class_name(name, frozenset(vocab) if vocab else None) == want


def test_info_nce_with_positives_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(0.0)
    eye = torch.eye(2, dtype=torch.bool)
    assert float(info_nce(img, txt, scale, eye)) == pytest.approx(float(info_nce(img, txt, scale)), abs=1e-6)
    # text 0 also describes image 1: image 1's row and text 0's column spread their target over two
    pos = torch.tensor([[True, False], [True, True]])
    lse = lambda row: math.log(sum(math.exp(v) for v in row))  # noqa: E731
    i2t = ((-1 + lse([1, 0.6])) + (-(0 + 0.8) / 2 + lse([0, 0.8]))) / 2  # image rows: [1, .6], [0, .8]
    t2i = ((-(1 + 0) / 2 + lse([1, 0])) + (-0.8 + lse([0.6, 0.8]))) / 2  # text rows: [1, 0], [.6, .8]
    assert float(info_nce(img, txt, scale, pos)) == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_shared_sentences_as_positives_still_learn() -> None:
    """Every image of a class has the same sentence (identical text rows, as in templated
    captions): with ``shared_positives`` they are matches, and the heads still learn the classes."""
    rng = np.random.default_rng(4)
    codes = rng.normal(size=(8, 6))
    img_class = np.repeat(np.arange(8), 12)
    images = codes[img_class] @ rng.normal(size=(6, 20)) + 0.05 * rng.normal(size=(96, 20))
    sentences = codes @ rng.normal(size=(6, 10))
    owner = np.arange(96)
    model = Alignment(20, 10, dim=8, temperature=0.1)
    losses = model.fit(images, sentences[img_class], owner, epochs=40, batch_size=32, lr=1e-2, shared_positives=True,
                       seed=0)
    assert losses[-1] < losses[0]
    sim = model.texts(sentences) @ model.images(images).T  # one query per class
    assert recall_at_k(sim, [set(np.flatnonzero(img_class == c).tolist()) for c in range(8)], ks=(1,))["R@1"] == 1.0


class _WordTower:
    """A stand-in text tower: a sentence's vector is the sum of fixed random vectors of its words."""

    def __init__(self, dim: int = 16) -> None:
        from landlens.models.text import TextTowerInfo

        self.info = TextTowerInfo("words", "file", "none", "ef" * 32, dim, 32)
        self.dim = dim
        vocab = {w: i for i, w in enumerate(["dense", "residential", "sea", "lake", "forest", "river"])}
        self.tokenizer = type("Tokenizer", (), {"get_vocab": lambda self: vocab})()

    def encode(self, sentences: list[str]) -> np.ndarray:
        import hashlib

        out = np.zeros((len(sentences), self.dim), np.float32)
        for i, s in enumerate(sentences):
            for w in s.lower().replace(".", " ").split():
                seed = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
                out[i] += np.random.default_rng(seed).normal(size=self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _captioned_folder(tmp_path: Path):
    import json

    from landlens.features.store import FeatureSet

    rng = np.random.default_rng(5)
    classes = ["forest", "river", "denseresidential"]
    words = {"forest": "green trees", "river": "water flows", "denseresidential": "many houses"}
    paths, labels, items = [], [], []
    for c, name in enumerate(classes):
        for k in range(8):
            p = f"{name}/{name}{k:02d}.jpg"
            paths.append(p)
            labels.append(c)
            items.append({"image": f"Images/{p}", "split": "train" if k < 6 else "test",
                          "sentences": [f"there are {words[name]}", f"{words[name]} number {k}"]})
    (tmp_path / "captions.json").write_text(json.dumps({"images": items}))
    feats = np.eye(3)[labels] @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(len(paths), 12))
    meta = {"dataset": {"root": str(tmp_path / "Images")},
            "identity": {"backbone": "fake", "weights_digest": "00" * 32}}
    return FeatureSet(feats.astype(np.float32), paths, np.asarray(labels), classes, meta, np.ones(len(paths), bool))


def test_train_alignment_is_seeded_and_takes_negative_only_classes(tmp_path: Path) -> None:
    from landlens.retrieval.textspace import TextSpace
    from landlens.retrieval.textstudy import evaluate_text, train_alignment

    fs, tower = _captioned_folder(tmp_path), _WordTower()
    cap = tmp_path / "captions.json"
    kw = dict(dim=8, epochs=5, batch_size=8, class_weight=1.0, templates=("{}", "a photo of {}."),
              extra_classes=["Forest", "dense_residential", "SeaLake"], cache_dir=tmp_path / "cache")
    a = train_alignment(fs, tower, cap, seed=3, **kw)
    torch.rand(100)  # the global generator moves on: the seed alone decides the heads
    b = train_alignment(fs, tower, cap, seed=3, **kw)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.trained["extra_classes"] == ["sea lake"]  # names that read like the folder's classes are skipped
    assert a.trained["weight_decay"] == 1e-4 and a.trained["shared_positives"] is False
    res = evaluate_text(TextSpace(a, tower), fs, cap, "test", cache_dir=tmp_path / "cache")
    assert res["images"] == 6 and res["sentences"] == 12
