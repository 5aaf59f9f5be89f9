"""Image-text alignment: InfoNCE against a hand-computed value, R@k against a brute force, the
captions reader's errors, and heads that learn a planted pairing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from landlens.errors import LandlensError
from landlens.retrieval.alignment import Alignment, info_nce, read_captions, recall_at_k


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


def test_read_captions_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"images": [{"image": "Images/a/a00.jpg", "split": "test", "sentences": ["x", "y"]}]}))
    (item,) = read_captions(good)
    assert item.image == "Images/a/a00.jpg" and item.split == "test" and item.sentences == ("x", "y")
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"images": [{"image": "a.jpg"}]}))
    with pytest.raises(LandlensError, match="entry 0 lacks"):
        read_captions(bad)
    with pytest.raises(LandlensError, match="cannot read captions file"):
        read_captions(tmp_path / "none.json")


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
