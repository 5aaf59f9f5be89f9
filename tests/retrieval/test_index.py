"""FAISS search indexes: exactness, recall of the approximate kinds, persistence, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from landlens.errors import LandlensError
from landlens.features.store import FeatureStore
from landlens.retrieval import index as index_mod
from landlens.retrieval.index import (
    SearchIndex,
    SearchIndexError,
    build_index_from_store,
    default_nlist,
    default_pq_m,
)


def _brute_force(db: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference kNN in float64 numpy: (distances, indices), nearest first."""
    db64, q64 = db.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        d = 1.0 - (q64 / np.linalg.norm(q64, axis=1, keepdims=True)) @ (db64 / np.linalg.norm(db64, axis=1, keepdims=True)).T
    else:
        d = np.sqrt(np.maximum(((q64[:, None, :] - db64[None, :, :]) ** 2).sum(-1), 0))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def _clustered(n: int, nq: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture (100 components) database and fresh queries from it."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, dim)).astype(np.float32) * 2.0
    db = centres[rng.integers(0, 100, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    q = centres[rng.integers(0, 100, nq)] + rng.standard_normal((nq, dim)).astype(np.float32)
    return db.astype(np.float32), q.astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    db, q = _clustered(20_000, 200, 64)
    truth = {m: SearchIndex("exact", m).fit(db).search(q, 10)[1] for m in ("cosine", "euclidean")}
    return db, q, truth


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_equals_brute_force_numpy(metric):
    rng = np.random.default_rng(1)
    db = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((25, 16)).astype(np.float32)
    index = SearchIndex("exact", metric).fit(db)
    dist, idx = index.search(q, 10)
    ref_d, ref_i = _brute_force(db, q, 10, metric)
    assert index.factory_ == "Flat" and index.kind_ == "exact"
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and dist.shape == (25, 10)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, atol=2e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_a_database_row_finds_itself_at_distance_zero(metric):
    db = np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32)
    dist, idx = SearchIndex("exact", metric).fit(db).search(db[[7, 42]], 1)
    assert idx[:, 0].tolist() == [7, 42]
    assert np.abs(dist).max() < 1e-5


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat", "ivf-pq", "IVF128,Flat", "HNSW16,Flat"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_kinds_reach_recall_at_10(clustered, kind, metric):
    db, q, truth = clustered
    index = SearchIndex(kind, metric, seed=0).fit(db)
    _, idx = index.search(q, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(idx, truth[metric])])
    assert recall >= 0.9, f"{kind} {metric}: recall@10 {recall:.3f}"
    assert index.ntotal == len(db)


def test_kinds_build_the_documented_faiss_structures(clustered):
    db = clustered[0]
    assert SearchIndex("hnsw", hnsw_m=16).fit(db).factory_ == "HNSW16,Flat"
    ivf = SearchIndex("ivf-flat").fit(db)
    assert ivf.factory_ == f"IVF{default_nlist(len(db))},Flat" and ivf.nlist_ == default_nlist(len(db))
    pq = SearchIndex("ivf-pq", nlist=64).fit(db)
    assert pq.factory_ == f"IVF64,PQ{default_pq_m(64)}x8np,RFlat"
    assert default_nlist(1_000_000) == 4000 and default_nlist(20_000) == 512 and default_nlist(10) == 1
    assert default_pq_m(1280) == 64 and default_pq_m(256) == 32 and default_pq_m(64) == 8


def test_ivf_with_an_hnsw_quantizer(clustered):
    db, q, truth = clustered
    index = SearchIndex("ivf-flat", "cosine", quantizer="hnsw").fit(db)
    assert index.factory_ == f"IVF{default_nlist(len(db))}_HNSW32,Flat"
    _, idx = index.search(q, 10)
    assert np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(idx, truth["cosine"])]) >= 0.9
    assert SearchIndex("ivf-flat", nlist=index_mod.HNSW_QUANTIZER_MIN_LIST).factory_string(10**6, 64).startswith(
        f"IVF{index_mod.HNSW_QUANTIZER_MIN_LIST}_HNSW32,")
    with pytest.raises(LandlensError, match="unknown quantizer 'tree'"):
        SearchIndex("ivf-flat", quantizer="tree").fit(db)


def test_auto_is_exact_for_small_databases_and_the_benchmarked_kind_beyond(monkeypatch, clustered):
    db = clustered[0]
    assert SearchIndex("auto").fit(db[:1000]).kind_ == "exact"
    monkeypatch.setattr(index_mod, "AUTO_EXACT_MAX", 5000)
    big = SearchIndex("auto").fit(db)
    assert big.kind_ == index_mod.AUTO_LARGE_KIND


def test_training_is_seeded(clustered):
    db, q, _ = clustered
    a = SearchIndex("ivf-flat", seed=3).fit(db).search(q, 10)
    b = SearchIndex("ivf-flat", seed=3).fit(db).search(q, 10)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("kind", ["exact", "ivf-pq", "hnsw"])
def test_save_load_round_trip_gives_identical_results(tmp_path, clustered, kind):
    db, q, _ = clustered
    db, paths = db[:4000], [f"c{i % 3}/img_{i}.png" for i in range(4000)]
    labels = [i % 3 for i in range(4000)]
    meta = {"identity": {"backbone": "resnet18", "weights_digest": "ab" * 32}}
    index = SearchIndex(kind, "cosine", nlist=32, nprobe=8, meta=meta).fit(
        db, paths=paths, labels=labels, classes=["x", "y", "z"])
    out = index.save(tmp_path / "idx")
    assert sorted(p.name for p in out.iterdir()) == ["index.faiss", "index.json"]
    doc = json.loads((out / "index.json").read_text())
    assert doc["factory"] == index.factory_ and doc["metric"] == "cosine" and doc["dim"] == 64
    assert doc["ntotal"] == 4000 and doc["meta"] == meta and doc["classes"] == ["x", "y", "z"]
    back = SearchIndex.load(out)
    assert back.paths_ == paths and back.labels_.tolist() == labels and back.nprobe == 8
    d1, i1 = index.search(q, 10)
    d2, i2 = back.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    # saving again replaces the folder; no temporary folders are left beside it
    index.save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_save_refuses_a_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    index = SearchIndex("exact").fit(np.ones((3, 4), np.float32))
    with pytest.raises(SearchIndexError, match="not a search index folder"):
        index.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(SearchIndexError, match="no search index at .*missing index.json"):
        SearchIndex.load(tmp_path / "nothing")
    out = SearchIndex("exact").fit(np.ones((3, 4), np.float32)).save(tmp_path / "idx")
    (out / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(SearchIndexError, match="cannot read index.faiss"):
        SearchIndex.load(out)


def test_add_appends_rows_with_their_paths():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    index = SearchIndex("exact", "euclidean").fit(a, paths=[f"a{i}" for i in range(50)])
    index.add(b, paths=[f"b{i}" for i in range(20)])
    _, idx = index.search(b[3], 1)
    assert index.ntotal == 70 and idx[0, 0] == 53 and index.paths_[53] == "b3"
    with pytest.raises(SearchIndexError, match="keeps paths"):
        index.add(b)


# ------------------------------------------------------------------ errors a user can cause


def test_empty_database_is_refused():
    index = SearchIndex("exact").fit(np.zeros((0, 8), np.float32))
    with pytest.raises(SearchIndexError, match="empty"):
        index.search(np.ones(8, np.float32), 1)
    with pytest.raises(SearchIndexError, match="empty"):
        SearchIndex("exact").search(np.ones(8, np.float32), 1)  # never fitted


def test_k_larger_than_the_database_names_both_numbers():
    index = SearchIndex("exact").fit(np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32))
    with pytest.raises(LandlensError, match=r"k=20 is larger than the database \(12 vectors\)"):
        index.search(np.ones(8, np.float32), 20)
    assert index.search(np.ones(8, np.float32), 12)[1].shape == (1, 12)  # no silent clamping needed


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_refused(k):
    index = SearchIndex("exact").fit(np.ones((5, 8), np.float32))
    with pytest.raises(LandlensError, match=f"k must be a positive integer, got {k}"):
        index.search(np.ones(8, np.float32), k)


def test_dimension_mismatch_names_both_dimensions():
    index = SearchIndex("exact").fit(np.ones((5, 8), np.float32))
    with pytest.raises(LandlensError, match="queries have 16 dimensions but the index holds 8-dimensional"):
        index.search(np.ones((2, 16), np.float32), 1)


@pytest.mark.parametrize("kind", ["brute", "hsnw", "Bogus32,Flat"])
def test_unknown_kind_is_named(kind):
    with pytest.raises(LandlensError, match=kind):
        SearchIndex(kind).fit(np.ones((100, 8), np.float32))


def test_unknown_metric_and_bad_settings_are_refused():
    with pytest.raises(LandlensError, match="unknown metric 'manhattan'"):
        SearchIndex("exact", "manhattan").fit(np.ones((5, 8), np.float32))
    with pytest.raises(LandlensError, match="nprobe must be a positive integer"):
        SearchIndex("ivf-flat", nprobe=0).fit(np.ones((5, 8), np.float32))


def test_non_finite_and_zero_rows_are_refused():
    db = np.ones((10, 4), np.float32)
    db[6, 2] = np.nan
    with pytest.raises(LandlensError, match="row 6"):
        SearchIndex("exact").fit(db)
    db[6] = 0.0
    with pytest.raises(LandlensError, match="all-zero row.*row 6"):
        SearchIndex("exact", "cosine").fit(db)
    assert SearchIndex("exact", "euclidean").fit(db).ntotal == 10


def test_too_few_vectors_to_train_is_refused():
    with pytest.raises(LandlensError, match="needs at least 256 vectors to train, got 100"):
        SearchIndex("ivf-pq", nlist=2).fit(np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32))


# ------------------------------------------------------------------ from a feature store


def _store(root, feats, valid, paths, labels, classes=("a", "b")):
    store = FeatureStore(root)
    identity = {"backbone": "resnet18", "arch": "timm/resnet18", "num_features": feats.shape[1],
                "weights_digest": "cd" * 32, "preprocessing": {"input_size": 32}, "rgb_bands": None}
    meta = store.begin(identity, {"name": None, "root": "/data", "classes": list(classes)}, paths, labels, 100,
                       extra={"backbone": {"backbone": "resnet18", "weights": {"source": "file", "ref": "/w.pth"}}})
    store.write_chunk(0, feats, valid, [])
    store.finalize(meta, feats.shape[1])
    return store


def test_build_index_from_store_indexes_valid_rows_and_records_the_identity(tmp_path):
    feats = np.random.default_rng(5).standard_normal((6, 8)).astype(np.float32)
    valid = np.array([True, True, False, True, True, True])
    feats[2] = np.nan
    paths = [f"{'ab'[i % 2]}/{i}.png" for i in range(6)]
    _store(tmp_path / "store", feats, valid, paths, [i % 2 for i in range(6)])
    index = build_index_from_store(tmp_path / "store", kind="auto", metric="euclidean")
    assert index.ntotal == 5 and index.kind_ == "exact"
    assert index.paths_ == [p for p, v in zip(paths, valid) if v] and index.classes_ == ["a", "b"]
    assert index.meta["identity"]["weights_digest"] == "cd" * 32
    assert index.meta["backbone"]["weights"]["ref"] == "/w.pth"
    assert index.meta["dataset"]["root"] == "/data" and index.meta["n_skipped_rows"] == 1
    _, idx = index.search(feats[3], 1)
    assert index.paths_[idx[0, 0]] == paths[3]


def test_build_index_from_an_incomplete_store_is_refused(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.begin({"backbone": "x"}, {"name": None, "root": "/d", "classes": ["a"]}, ["a/1.png"], [0], 10)
    with pytest.raises(LandlensError, match="incomplete"):
        build_index_from_store(tmp_path / "store")
