"""Protocols (archive, split with either database) on hand-built feature sets with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from landlens.data.splits import SplitManifest, make_split
from landlens.errors import DatasetError, LandlensError
from landlens.features.store import FeatureSet
from landlens.retrieval.evaluate import evaluate
from landlens.retrieval.metrics import NoRelevantWarning
from landlens.retrieval.protocols import archive_protocol, resolve_protocol, split_protocol

CLASSES = ["A", "B"]
#        path      class  x     part
ROWS = [("A/a1.png", 0, 0.0, "test"),
        ("A/a2.png", 0, 10.0, "train"),
        ("B/b1.png", 1, 1.5, "train"),
        ("A/a3.png", 0, 3.0, "test"),
        ("B/b2.png", 1, 2.0, "test")]


def _features(rows=ROWS, meta=None) -> FeatureSet:
    x = np.array([[r[2]] for r in rows], dtype=np.float32)
    return FeatureSet(x, [r[0] for r in rows], np.array([r[1] for r in rows]), list(CLASSES),
                      meta or {"dataset": {"name": "toy"}, "identity": {"backbone": "bb"}}, np.ones(len(rows), bool))


def _manifest(rows=ROWS) -> SplitManifest:
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for path, label, _, part in rows:
        parts[part].append((path, label))
    return SplitManifest({k: sorted(v) for k, v in parts.items()}, list(CLASSES), {"train": 0.4, "test": 0.6},
                         seed=0, kind="holdout")


def test_archive_protocol_excludes_each_query_itself():
    p = resolve_protocol(_features(), "archive")
    assert p.n_queries == 5 and p.n_database == 5
    np.testing.assert_array_equal(p.exclude, np.arange(5))
    assert p.queries_are_database
    assert p.to_dict()["n_database_per_query"] == 4
    assert archive_protocol(3).query_indices.tolist() == [0, 1, 2]


def test_split_query_and_database_sets():
    fs, m = _features(), _manifest()
    full = split_protocol(fs, m, "archive-minus-query")
    # the test part in manifest order (sorted by path): a1, a3, b2 = rows 0, 3, 4
    assert full.query_indices.tolist() == [0, 3, 4]
    assert full.database_indices.tolist() == [0, 1, 2, 3, 4]
    assert full.exclude.tolist() == [0, 3, 4]  # each query leaves out its own row
    assert not full.queries_are_database
    test = split_protocol(fs, m, "test")
    assert test.database_indices.tolist() == [0, 3, 4]
    assert test.exclude.tolist() == [0, 1, 2]
    assert test.queries_are_database
    assert test.to_dict()["n_database_per_query"] == 2 and full.to_dict()["n_database_per_query"] == 4


def test_split_databases_give_the_hand_computed_values():
    fs, m = _features(), _manifest()
    # archive-minus-query, Euclidean on x:
    #   a1 (0): b1 1.5, b2 2, a3 3, a2 10 -> relevant at 3, 4 -> AP (1/3 + 2/4)/2 = 5/12
    #   a3 (3): b2 1, b1 1.5, a1 3, a2 7  -> relevant at 3, 4 -> AP 5/12
    #   b2 (2): b1 0.5, a3 1, a1 2, a2 8  -> relevant at 1    -> AP 1
    r = evaluate(fs, distance="euclidean", protocol="split", manifest=m, database="archive-minus-query",
                 precision_at=(1, 2))
    np.testing.assert_allclose(r.scores.ap, [5 / 12, 5 / 12, 1.0])
    assert r.metrics["mAP"] == pytest.approx((5 / 12 + 5 / 12 + 1) / 3)
    assert r.metrics["P@2"] == pytest.approx((0 + 0 + 0.5) / 3)
    # test database: a1 -> b2 2, a3 3 (AP 1/2); a3 -> b2 1, a1 3 (AP 1/2); b2 has no other B: left out
    with pytest.warns(NoRelevantWarning):
        t = evaluate(fs, distance="euclidean", protocol="split", manifest=m, database="test", precision_at=(1, 2))
    assert t.scores.ap[:2].tolist() == [0.5, 0.5] and np.isnan(t.scores.ap[2])
    assert t.metrics["mAP"] == pytest.approx(0.5)
    assert t.scores.n_skipped == 1
    d = t.to_dict()
    assert d["protocol"]["database"] == "test" and d["protocol"]["n_queries"] == 3
    assert d["queries"]["skipped_no_relevant"] == 1
    assert "left out of every mean" in t.to_markdown()


def test_split_protocol_errors_name_the_problem():
    fs = _features()
    other = _manifest([("A/zz.png", 0, 0.0, "test"), *ROWS[1:]])
    with pytest.raises(DatasetError, match=r"1 file\(s\) of the split are not in the feature set toy/bb.*A/zz.png"):
        split_protocol(fs, other, "test")
    relabelled = _manifest([("A/a1.png", 1, 0.0, "test"), *ROWS[1:]])
    with pytest.raises(DatasetError, match="A/a1.png .B in the split, A in the features"):
        split_protocol(fs, relabelled, "test")
    with pytest.raises(LandlensError, match="needs a split manifest"):
        resolve_protocol(fs, "split")
    with pytest.raises(LandlensError, match="needs the split protocol"):
        resolve_protocol(fs, "archive", database="test")
    with pytest.raises(LandlensError, match="unknown protocol"):
        resolve_protocol(fs, "leave-one-out")
    with pytest.raises(DatasetError, match="no part 'val'"):
        resolve_protocol(fs, "split", manifest=_manifest(), part="val")


def test_unreadable_split_images_are_dropped_not_fatal():
    # b1 could not be read at extraction: it has no feature row but the store lists it
    rows = [r for r in ROWS if r[0] != "B/b1.png"]
    meta = {"dataset": {"name": "toy"}, "identity": {"backbone": "bb"},
            "failures": [{"path": "B/b1.png", "reason": "truncated"}]}
    p = split_protocol(_features(rows, meta), _manifest(), "archive-minus-query")
    assert p.dropped == ["B/b1.png"] and p.n_database == 4
    assert p.to_dict()["dropped_unreadable"] == ["B/b1.png"]


def test_empty_database_and_no_queries_are_one_clear_error():
    single = _features(ROWS[:1])
    with pytest.raises(LandlensError, match="database is empty"):
        evaluate(single, protocol="archive")
    only_train = _manifest([(p, c, x, "train") for p, c, x, _ in ROWS])
    only_train.parts["test"] = []
    with pytest.raises(LandlensError, match="no query images"):
        evaluate(_features(), protocol="split", manifest=only_train)
    one_test = _manifest([(p, c, x, "test" if i == 0 else "train") for i, (p, c, x, _) in enumerate(ROWS)])
    with pytest.raises(LandlensError, match="database is empty"):
        evaluate(_features(), protocol="split", manifest=one_test, database="test")


def test_no_relevant_item_anywhere_is_an_error():
    rows = [("A/a.png", 0, 0.0, "test"), ("B/b.png", 1, 1.0, "test")]
    with pytest.warns(NoRelevantWarning), pytest.raises(LandlensError, match="no query has a relevant image"):
        evaluate(_features(rows), protocol="archive")


def test_feature_rows_with_nan_are_refused_naming_the_set():
    fs = _features()
    fs.features[2, 0] = np.nan
    with pytest.raises(LandlensError, match="feature set toy/bb has 1 row"):
        evaluate(fs)


def test_chi2_on_negative_features_names_the_set():
    fs = _features([(p, c, x - 5.0, part) for p, c, x, part in ROWS])
    with pytest.raises(LandlensError, match="feature set toy/bb has negative values"):
        evaluate(fs, distance="chi2")


def test_split_of_a_real_manifest_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    paths = [f"c{y}/img{i:03d}.png" for i, y in enumerate(labels)]
    fs = FeatureSet(rng.normal(size=(60, 8)).astype(np.float32) + labels[:, None], paths, labels,
                    ["c0", "c1", "c2"], {"dataset": {"name": "gen"}}, np.ones(60, bool))
    manifest = make_split(paths, labels, ["c0", "c1", "c2"], ratios="70/30", seed=1)
    manifest = SplitManifest.load(manifest.save(tmp_path / "split.json"))
    r = evaluate(fs, protocol="split", manifest=manifest, database="test")
    test_paths, _ = manifest.part("test")
    assert r.protocol.n_queries == len(test_paths) == 18
    assert sorted(fs.paths[i] for i in r.protocol.query_indices) == sorted(test_paths)
    a = evaluate(fs, protocol="split", manifest=manifest)
    assert a.protocol.n_database == 60
    assert a.metrics["mAP"] != r.metrics["mAP"]
