"""Rocchio relevance feedback (``landlens.retrieval.feedback``): hand-computed refined queries,
a tiny archive where feedback brings more same-class images into the top k (checked against a
brute-force cosine ranking in NumPy), and ``landlens search --relevant/--irrelevant``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.make_datasets import make_dataset

from landlens.cli.search import search_cmd
from landlens.errors import LandlensError
from landlens.retrieval.feedback import (ROCCHIO_A, ROCCHIO_B, ROCCHIO_C, FeedbackError, RocchioWeights, rocchio,
                                         rocchio_weights)

# ---------------------------------------------------------------------- the formula


def test_defaults_are_the_textbook_values() -> None:
    assert (ROCCHIO_A, ROCCHIO_B, ROCCHIO_C) == (1.0, 0.75, 0.15)
    assert RocchioWeights().to_dict() == {"a": 1.0, "b": 0.75, "c": 0.15}


def test_rocchio_2d_by_hand() -> None:
    # q = (3, 4) -> (0.6, 0.8); relevant (1, 0), (0, 2) -> (1, 0), (0, 1), mean (0.5, 0.5);
    # irrelevant (0, -5) -> (0, -1).
    # q' = (0.6, 0.8) + 0.75 (0.5, 0.5) - 0.15 (0, -1) = (0.975, 1.325), |q'| = sqrt(2.70625)
    out = rocchio([3.0, 4.0], [[1.0, 0.0], [0.0, 2.0]], [[0.0, -5.0]])
    assert out.dtype == np.float32 and out.shape == (2,)
    norm = math.sqrt(0.975 ** 2 + 1.325 ** 2)
    assert norm == pytest.approx(math.sqrt(2.70625))
    np.testing.assert_allclose(out, [0.975 / norm, 1.325 / norm], rtol=1e-6)
    # scale: the same direction, another length
    np.testing.assert_allclose(rocchio([3.0, 4.0], [[1.0, 0.0], [0.0, 2.0]], [[0.0, -5.0]], scale=5.0),
                               [5 * 0.975 / norm, 5 * 1.325 / norm], rtol=1e-6)


def test_rocchio_3d_by_hand_keeps_negative_components() -> None:
    # a=0.5, b=1, c=0.5; q = (0, 0, 2) -> (0, 0, 1); relevant (1, 0, 0);
    # irrelevant (0, 0, 1), (0, 3, 0) -> mean (0, 0.5, 0.5).
    # q' = (0, 0, 0.5) + (1, 0, 0) - (0, 0.25, 0.25) = (1, -0.25, 0.25), |q'| = sqrt(1.125)
    out = rocchio(np.array([[0.0, 0.0, 2.0]]), np.array([[1.0, 0.0, 0.0]]),
                  np.array([[0.0, 0.0, 1.0], [0.0, 3.0, 0.0]]), a=0.5, b=1.0, c=0.5)
    np.testing.assert_allclose(out, np.array([1.0, -0.25, 0.25]) / math.sqrt(1.125), rtol=1e-6)
    assert out[1] < 0  # not clipped


def test_empty_sets_drop_their_terms() -> None:
    q = np.array([2.0, 0.0, 0.0])
    # no marks at all: the normalised query
    np.testing.assert_allclose(rocchio(q), [1.0, 0.0, 0.0])
    # only relevant: (1, 0, 0) + 0.75 (0, 1, 0) -> (1, 0.75, 0) / 1.25 = (0.8, 0.6, 0)
    np.testing.assert_allclose(rocchio(q, [[0.0, 4.0, 0.0]], []), [0.8, 0.6, 0.0], rtol=1e-6)
    # only irrelevant: (1, 0, 0) - 0.15 (0, 0, 1) -> / sqrt(1.0225)
    np.testing.assert_allclose(rocchio(q, np.zeros((0, 3)), [[0.0, 0.0, 9.0]]),
                               np.array([1.0, 0.0, -0.15]) / math.sqrt(1.0225), rtol=1e-6)


def test_errors_are_one_line_feedback_errors() -> None:
    with pytest.raises(FeedbackError, match="zero vector"):
        rocchio([1.0, 0.0], [], [[2.0, 0.0]], a=1.0, b=0.0, c=1.0)  # q - q = 0
    with pytest.raises(FeedbackError, match="all zeros"):
        rocchio([0.0, 0.0], [[1.0, 0.0]])
    with pytest.raises(FeedbackError, match="3 dimensions, the query has 2"):
        rocchio([1.0, 0.0], [[1.0, 0.0, 0.0]])
    with pytest.raises(FeedbackError, match="NaN"):
        rocchio([1.0, 0.0], [[np.nan, 0.0]])
    with pytest.raises(FeedbackError, match="weight c"):
        rocchio([1.0, 0.0], c=-0.1)
    with pytest.raises(FeedbackError, match="all 0"):
        RocchioWeights(0, 0, 0)
    with pytest.raises(FeedbackError, match="weight a"):
        RocchioWeights(True, 1, 1)
    with pytest.raises(FeedbackError, match="scale"):
        rocchio([1.0, 0.0], scale=0.0)
    assert issubclass(FeedbackError, LandlensError)


def test_rocchio_weights_parsing() -> None:
    assert rocchio_weights(None) == RocchioWeights()
    assert rocchio_weights({"b": 0.5}) == RocchioWeights(1.0, 0.5, 0.15)
    assert rocchio_weights((2, 1, 0)) == RocchioWeights(2.0, 1.0, 0.0)
    with pytest.raises(FeedbackError, match="'d'"):
        rocchio_weights({"d": 1})
    with pytest.raises(FeedbackError, match="three numbers"):
        rocchio_weights([1, 2])


# ---------------------------------------------------------------------- on a tiny archive

K = 5


@pytest.fixture(scope="module")
def archive_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 classes x 6 images (64 px, UC Merced layout) indexed with LBP-RGB features."""
    from landlens.retrieval.archive import Archive

    tmp = tmp_path_factory.mktemp("feedback")
    data = make_dataset(tmp / "data", "ucmerced", per_class=6, size=64, classes=4)
    archive = Archive.build(data, tmp / "archive", backbone="lbp_rgb", rerank=None, progress=False)
    return {"archive": archive, "data": data, "tmp": tmp}


def _brute_force(vectors: np.ndarray, q: np.ndarray, k: int, exclude: int | None) -> list[int]:
    """Rows of the ``k`` highest cosine similarities (NumPy, no index)."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = v @ (q / np.linalg.norm(q))
    if exclude is not None:
        sim[exclude] = -np.inf
    return [int(i) for i in np.argsort(-sim, kind="stable")[:k]]


def test_feedback_brings_more_same_class_images_into_the_top_k(archive_env: dict[str, Any]) -> None:
    archive = archive_env["archive"]
    records = archive.records()
    vectors = np.stack([archive.vector(r.id) for r in records])
    row_of = {r.id: i for i, r in enumerate(records)}

    def same(hits: list[Any], cls: str) -> int:
        return sum(h.record.class_name == cls for h in hits)

    # the query whose plain top k holds the fewest images of its own class
    qrec = min(records, key=lambda r: (same(archive.search_id(r.id, K), r.class_name), r.id))
    before = archive.search_id(qrec.id, K)
    n_before = same(before, qrec.class_name)
    assert 1 <= n_before < K - 1  # room to improve, something to mark relevant
    relevant = [h.record.id for h in before if h.record.class_name == qrec.class_name]
    irrelevant = [h.record.id for h in before if h.record.class_name != qrec.class_name]
    assert len({archive.record(i).class_name for i in irrelevant}) >= 1

    refined = rocchio(archive.vector(qrec.id), np.stack([archive.vector(i) for i in relevant]),
                      np.stack([archive.vector(i) for i in irrelevant]))
    after = archive.search_vectors(refined[None], K, exclude=[qrec.id])[0]
    # the archive's answer is the brute-force cosine ranking of the refined query
    assert [row_of[h.record.id] for h in after] == _brute_force(vectors, refined, K, row_of[qrec.id])
    n_after = same(after, qrec.class_name)
    assert n_after > n_before
    assert (n_before, n_after) == (2, 4)  # this fixture: two more right answers in the top 5
    # the marked relevant images stay in the results
    assert set(relevant) <= {h.record.id for h in after}


# ---------------------------------------------------------------------- the search command


def _store_features(archive: Any) -> tuple[np.ndarray, list[Any]]:
    """The archive's vectors and records read back from its feature store, row i = id i."""
    from landlens.features.store import FeatureStore

    feats = FeatureStore(archive.info()["feature_store"]).load().features
    records = archive.records()
    assert [r.id for r in records] == list(range(len(records))) == list(range(len(feats)))
    return np.asarray(feats), records


def test_search_cli_with_relevance_feedback(archive_env: dict[str, Any]) -> None:
    archive = archive_env["archive"]
    feats, records = _store_features(archive)
    assert len(feats) == 24
    qid = 3
    query = Path(records[qid].path)
    qclass = records[qid].class_name
    same = [r.id for r in records if r.class_name == qclass and r.id != qid]
    other = [r.id for r in records if r.class_name != qclass]
    relevant, irrelevant = same[:2], other[:3]
    args = [archive.directory, query, "--k", "8", "--json"]
    for r in relevant:
        args += ["--relevant", r]
    for r in irrelevant:
        args += ["--irrelevant", r]
    res = CliRunner().invoke(search_cmd, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (q,) = doc["results"]
    assert doc["feedback"] == {"method": "rocchio", "weights": {"a": 1.0, "b": 0.75, "c": 0.15},
                               "relevant": relevant, "irrelevant": irrelevant}
    # the query is an archive image: its stored vector is the embedding the command computes
    refined = rocchio(feats[qid], feats[relevant], feats[irrelevant])
    assert [h["id"] for h in q["hits"]] == _brute_force(feats, refined, 8, None)
    plain = _brute_force(feats, feats[qid], 8, None)
    assert [h["id"] for h in q["hits"]] != plain  # the marks changed the answer
    assert q["query_class"] == qclass and q["query_id"] == qid
    # the Python API: Archive.refine, then a search by vector
    api = archive.search(archive.refine(archive.vector(qid), relevant, irrelevant), k=8)
    assert [h.record.id for h in api] == [h["id"] for h in q["hits"]]

    # the table shows each hit's id, to mark in the next round
    res = CliRunner().invoke(search_cmd, [str(a) for a in [archive.directory, query, "--k", "3",
                                                             "--relevant", relevant[0], "--rocchio", 1, 0.5, 0]])
    assert res.exit_code == 0, res.output
    assert "refined by Rocchio (a=1, b=0.5, c=0) with 1 relevant and 0 non-relevant image(s)" in res.stdout
    ids = _brute_force(feats, rocchio(feats[qid], feats[[relevant[0]]], a=1, b=0.5, c=0), 3, None)
    table = [line.strip("|").split("|") for line in res.stdout.splitlines() if line[:3] in ("| 1", "| 2", "| 3")]
    assert [int(cells[-1]) for cells in table] == ids
    assert [cells[-2].strip() for cells in table] == [records[i].name for i in ids]


def test_search_cli_feedback_errors(archive_env: dict[str, Any]) -> None:
    archive = archive_env["archive"]
    query = Path(archive.record(0).path)

    def run(*extra: Any) -> Any:
        return CliRunner().invoke(search_cmd, [str(a) for a in [archive.directory, query, *extra]])

    res = run("--relevant", 99)
    assert res.exit_code == 2 and "relevant: no image with id 99 in the archive" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run("--relevant", 1, "--irrelevant", 1)
    assert res.exit_code == 2 and "image 1 is marked both" in res.stderr
    res = run(query, "--relevant", 1)
    assert res.exit_code == 2 and "refines one query" in res.stderr
    res = run("--irrelevant", 0, "--rocchio", 1, 0, 1)  # the query itself, a = c: nothing left
    assert res.exit_code == 2 and "zero vector" in res.stderr
