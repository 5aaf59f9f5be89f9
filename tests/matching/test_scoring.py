"""Fast pair scoring, the learned retrieval distance and discriminator files (landlens.matching.scoring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from landlens.errors import CheckpointError, ConfigError, LandlensError
from landlens.matching.networks import DMLConfig, FeatureMismatchError, MatchingDiscriminator
from landlens.matching.scoring import (
    LearnedDistance,
    PairScorer,
    check_features,
    load_discriminator,
    match_distance,
    read_discriminator_meta,
    save_discriminator,
)
from landlens.retrieval.distances import get_distance
from landlens.retrieval.metrics import evaluate_retrieval


def make_disc(kind: str = "resdyad", c: int = 3, s: int = 2, w: int = 6, seed: int = 0) -> MatchingDiscriminator:
    """A small discriminator with random weights and BN statistics whose outputs vary between pairs."""
    torch.manual_seed(seed)
    d = MatchingDiscriminator(DMLConfig(kind=kind, in_channels=c, spatial=s, width=w))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        d.fc.weight.mul_(30.0)  # spread the probabilities away from 0.5
    return d


def pairwise_reference(d: MatchingDiscriminator, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """P(match) by calling ``d(a, b)`` on one pair at a time."""
    d.eval()
    with torch.no_grad():
        return torch.tensor([[torch.softmax(d(q[i:i + 1], db[j:j + 1]), 1)[0, 1].item()
                              for j in range(db.shape[0])] for i in range(q.shape[0])])


@pytest.mark.parametrize("kind", ["resdyad", "res"])
@pytest.mark.parametrize("batch_pairs", [4096, 7])
def test_score_equals_naive(kind: str, batch_pairs: int) -> None:
    d = make_disc(kind, c=5, s=4, w=8)
    d.train()  # the scorer must switch to eval mode and restore the flag
    q, db = torch.randn(3, 5, 4, 4), torch.randn(20, 5, 4, 4)
    scorer = PairScorer(d)
    fast = scorer.score(scorer.prepare_query(q), scorer.prepare_db(db), batch_pairs=batch_pairs)
    naive = scorer.score_naive(q, db, batch_pairs=batch_pairs)
    assert d.training
    assert fast.shape == (3, 20)
    assert float((fast - naive).abs().max()) < 1e-4
    ref = pairwise_reference(d, q, db)
    assert float((naive - ref).abs().max()) < 1e-5
    assert float(ref.std()) > 0.03  # the check is not vacuous: probabilities differ between pairs
    # flattened rows work the same
    flat = scorer.score(scorer.prepare_query(q.flatten(1)), scorer.prepare_db(db.flatten(1).numpy()))
    assert float((flat - fast).abs().max()) < 1e-6


def test_match_distance_without_shortlist() -> None:
    d = make_disc()
    q, db = torch.randn(4, 3, 2, 2), torch.randn(9, 3, 2, 2)
    dist = match_distance(q, db, PairScorer(d))
    assert torch.allclose(dist, 1.0 - pairwise_reference(d, q, db), atol=1e-5)


def test_shortlist_hand_built() -> None:
    """Query at the origin, items along one axis at known distances: the Euclidean order is fixed."""
    d = make_disc(c=3, s=1, w=6)
    scorer = PairScorer(d)
    radius = [3.0, 1.0, 4.0, 1.5, 5.0, 2.0]  # Euclidean order: 1, 3, 5, 0, 2, 4
    db = torch.zeros(6, 3)
    db[:, 0] = torch.tensor(radius)
    q = torch.zeros(1, 3)
    dist = match_distance(q, db, scorer, shortlist=2)[0]
    p = pairwise_reference(d, q, db)[0]
    # the shortlist (items 1 and 3) gets 1 - P(match)
    assert dist[1].item() == pytest.approx(1 - p[1].item(), abs=1e-5)
    assert dist[3].item() == pytest.approx(1 - p[3].item(), abs=1e-5)
    # the rest: 1 + Euclidean rank / ndb
    for item, rank in {5: 2, 0: 3, 2: 4, 4: 5}.items():
        assert dist[item].item() == pytest.approx(1 + rank / 6)
    order = torch.argsort(dist).tolist()
    assert set(order[:2]) == {1, 3} and order[2:] == [5, 0, 2, 4]
    # a shortlist as long as the archive scores everything
    full = match_distance(q, db, scorer, shortlist=6)[0]
    assert torch.allclose(full, 1 - p, atol=1e-5)
    with pytest.raises(ConfigError, match="shortlist"):
        match_distance(q, db, scorer, shortlist=0)


def test_shortlist_matches_distance_object(tmp_path: Path) -> None:
    d = make_disc()
    save_discriminator(d, tmp_path / "disc")
    q, db = torch.randn(5, 12), torch.randn(30, 12)
    dist = get_distance("learned", model=tmp_path / "disc", shortlist=4)
    ours = dist(q, db)
    ref = match_distance(q, db, PairScorer(d), shortlist=4)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert int((ours <= 1).sum()) == 5 * 4
    # independent reference for the Euclidean part: ranks from torch.cdist
    rank = torch.argsort(torch.argsort(torch.cdist(q, db), dim=1), dim=1)
    shortlisted = rank < 4
    assert torch.equal(ours <= 1, shortlisted)
    assert torch.allclose(ours[~shortlisted], 1 + rank[~shortlisted].float() / 30)


def test_learned_distance_via_registry(tmp_path: Path) -> None:
    d = make_disc(c=3, s=2, w=6)
    save_discriminator(d, tmp_path / "disc", extra={"features": {"backbone": "toy", "dim": 12}})
    dist = get_distance("learned", model=str(tmp_path / "disc"))
    assert isinstance(dist, LearnedDistance) and dist.name == "learned" and not dist.symmetric
    q, db = torch.randn(4, 12), torch.randn(7, 12)
    value = dist(q, db)
    expected = 1.0 - pairwise_reference(d, q.view(4, 3, 2, 2), db.view(7, 3, 2, 2))
    assert torch.allclose(value, expected, atol=1e-5)
    out = torch.empty(4, 7)
    dist.compute(dist.prepare(q), dist.prepare(db), out=out)
    assert torch.allclose(out, expected, atol=1e-5)
    assert dist.to_dict()["features"] == {"backbone": "toy", "dim": 12}
    with pytest.raises(FeatureMismatchError) as info:
        dist(torch.randn(4, 13), torch.randn(7, 13))
    msg = str(info.value)
    assert isinstance(info.value, LandlensError) and "\n" not in msg and "13" in msg and "12" in msg
    with pytest.raises(FeatureMismatchError):
        dist.check(np.zeros((3, 16)), "the query features")


def test_learned_distance_in_archive_evaluation(tmp_path: Path) -> None:
    """The archive protocol prepares one matrix for queries and database: results must match a plain callable."""
    d = make_disc()
    save_discriminator(d, tmp_path / "disc")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 12)).astype(np.float32)
    labels = np.repeat(np.arange(3), 4)
    scorer = PairScorer(d)
    got = evaluate_retrieval(feats, labels, metric=get_distance("learned", model=tmp_path / "disc"),
                             precision_at=(1, 3), confusion_k=0)
    ref = evaluate_retrieval(feats, labels, metric=lambda a, b: match_distance(a, b, scorer),
                             precision_at=(1, 3), confusion_k=0)
    np.testing.assert_allclose(got.ap, ref.ap, atol=1e-6)


def test_save_load_round_trip(tmp_path: Path) -> None:
    d = make_disc("res", c=4, s=1, w=5)
    path = save_discriminator(d, tmp_path / "run", extra={"features": {"backbone": "b", "dim": 4}, "note": 1})
    assert path.name == "discriminator.json" and (tmp_path / "run" / "discriminator.safetensors").is_file()
    loaded = load_discriminator(tmp_path / "run")
    assert not loaded.training and loaded.config == d.config
    sd, ld = d.state_dict(), loaded.state_dict()
    assert set(sd) == set(ld) and all(torch.equal(sd[k], ld[k]) for k in sd)
    meta = read_discriminator_meta(path)
    assert meta["extra"]["note"] == 1 and meta["features_shape"] == [4, 1, 1]
    q, db = torch.randn(2, 4), torch.randn(3, 4)
    assert torch.allclose(PairScorer(loaded).score_naive(q, db), PairScorer(d).score_naive(q, db))


def test_bad_files_raise_checkpoint_error(tmp_path: Path) -> None:
    d = make_disc()
    run = tmp_path / "run"
    save_discriminator(d, run)
    meta_path = run / "discriminator.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="discriminator.json") as info:
        load_discriminator(run)
    assert "99" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="discriminator.json"):
        get_distance("learned", model=run)
    # a config that does not fit the tensors
    meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], "width": 7}}))
    with pytest.raises(CheckpointError, match="discriminator.safetensors"):
        load_discriminator(run)
    meta_path.write_text(json.dumps({**meta, "format": "landlens-classifier"}))
    with pytest.raises(CheckpointError, match="not a landlens matching-discriminator"):
        load_discriminator(run)
    with pytest.raises(CheckpointError, match="not found"):
        load_discriminator(tmp_path / "missing")


def test_check_features(tmp_path: Path) -> None:
    save_discriminator(make_disc(), tmp_path / "disc", extra={"features": {"backbone": "geoembed_v3", "dim": 12}})
    meta = read_discriminator_meta(tmp_path / "disc")
    check_features(meta, {"backbone": "geoembed_v3", "dim": 12, "other": "ignored"})
    with pytest.raises(FeatureMismatchError) as info:
        check_features(meta, {"backbone": "resnet18", "dim": 12})
    msg = str(info.value)
    assert "geoembed_v3" in msg and "resnet18" in msg and "\n" not in msg
    check_features({"extra": {}}, {"backbone": "anything"})  # nothing recorded: accepted
    with pytest.raises(FeatureMismatchError):
        get_distance("learned", model=tmp_path / "disc", features={"backbone": "resnet18"})
