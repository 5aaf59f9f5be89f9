"""The on-disk IVF-PQ index: streamed shard build, memory-mapped search, exact re-ranking checked
against a NumPy brute force, resuming an interrupted build, and refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fixtures.neighbours import cosine_top_k
from landlens.retrieval.ondisk import (
    LISTS_FILE, SHARDS, DiskIndex, DiskIndexError, DiskIndexSettings, NpyRows, build_disk_index,
)

N, DIM = 24_000, 16
SETTINGS = DiskIndexSettings(nlist=64, pq_m=4, opq=False, shard_size=8_000, nprobe=64, refine_factor=20)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, DIM))
    x = (centres[rng.integers(0, 40, N)] + 0.3 * rng.normal(size=(N, DIM))).astype(np.float32)
    q = (centres[rng.integers(0, 40, 30)] + 0.3 * rng.normal(size=(30, DIM))).astype(np.float32)
    path = tmp_path_factory.mktemp("ondisk") / "vectors.npy"
    np.save(path, x)
    return path, x, q


@pytest.fixture(scope="module")
def built(data, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    path, _, _ = data
    out = tmp_path_factory.mktemp("ondisk_index") / "idx"
    build_disk_index(NpyRows(path), N, DIM, out, SETTINGS)
    return out


def test_npy_rows_reads_what_numpy_reads(data) -> None:  # noqa: ANN001
    path, x, _ = data
    rows = NpyRows(path)
    assert (rows.n, rows.dim) == (N, DIM)
    np.testing.assert_array_equal(rows(5, 17), x[5:17])
    np.testing.assert_array_equal(rows(N - 3, N), x[N - 3:])


@pytest.mark.parametrize("opq", [False, True])
def test_re_ranked_search_matches_a_brute_force(built: Path, data, tmp_path: Path, opq: bool) -> None:  # noqa: ANN001
    path, x, q = data
    out = built if not opq else build_disk_index(NpyRows(path), N, DIM, tmp_path / "opq",
                                                 replace(SETTINGS, opq=True, train_size=4096)).folder
    idx = DiskIndex.open(out, path)
    assert idx.ntotal == N and not (out / SHARDS).exists()
    meta = json.loads((out / "disk_index.json").read_text())
    assert meta["factory"] == ("OPQ4," if opq else "") + "IVF64_HNSW32,PQ4x8np" and meta["state"] == "done"
    assert idx.disk_bytes() < x.nbytes / 2  # 4-byte codes and 8-byte ids for 64-byte vectors
    want_d, want = cosine_top_k(x, q, 10)
    dist, ids = idx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), want.tolist())])
    assert recall >= 0.97
    # the re-ranked distances are the exact ones of the ids returned, in order
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    exact = 1.0 - np.einsum("qd,qkd->qk", qn, xn[ids])
    np.testing.assert_allclose(dist, exact, atol=1e-5)
    assert (np.diff(dist, axis=1) >= -1e-7).all()
    # from the PQ codes alone the ranking is approximate, and worse
    _, pq_ids = idx.search(q, 10, rerank=False)
    pq_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pq_ids.tolist(), want.tolist())])
    assert pq_recall < recall


def test_an_interrupted_build_resumes_at_the_first_missing_shard(data, built: Path, tmp_path: Path) -> None:  # noqa: ANN001
    path, _, q = data

    class Failing(NpyRows):
        def __call__(self, start: int, stop: int) -> np.ndarray:
            if start >= 16_000:
                raise OSError("disk went away")
            return super().__call__(start, stop)

    out = tmp_path / "idx"
    with pytest.raises(OSError, match="disk went away"):
        build_disk_index(Failing(path), N, DIM, out, SETTINGS)
    assert sorted(p.name for p in (out / SHARDS).iterdir()) == ["shard-00000.index", "shard-00001.index"]
    with pytest.raises(DiskIndexError, match="not finished"):
        DiskIndex.open(out)
    with pytest.raises(DiskIndexError, match="other settings"):
        build_disk_index(NpyRows(path), N, DIM, out, DiskIndexSettings(nlist=32, pq_m=4, shard_size=8_000))
    idx = build_disk_index(NpyRows(path), N, DIM, out, SETTINGS)
    assert idx.meta["shards_encoded"] == 1 and "train_seconds" not in idx.meta  # the rest was kept
    ref = DiskIndex.open(built)
    for a, b in zip(idx.search(q, 10, rerank=False), ref.search(q, 10, rerank=False)):
        np.testing.assert_array_equal(a, b)  # the same index as an uninterrupted build
    with pytest.raises(DiskIndexError, match="already holds"):
        build_disk_index(NpyRows(path), N, DIM, out, SETTINGS)


def test_worker_processes_build_the_same_index(data, built: Path, tmp_path: Path) -> None:  # noqa: ANN001
    path, _, q = data
    idx = build_disk_index(NpyRows(path), N, DIM, tmp_path / "par", SETTINGS, workers=2)
    assert (tmp_path / "par" / LISTS_FILE).is_file()
    ref = DiskIndex.open(built)
    for a, b in zip(idx.search(q, 10, rerank=False), ref.search(q, 10, rerank=False)):
        np.testing.assert_array_equal(a, b)


def test_ray_tasks_build_the_same_index(data, built: Path, tmp_path: Path) -> None:  # noqa: ANN001
    ray = pytest.importorskip("ray")
    path, _, q = data
    try:
        idx = build_disk_index(NpyRows(path), N, DIM, tmp_path / "ray", SETTINGS, engine="ray")
    finally:
        ray.shutdown()
    ref = DiskIndex.open(built)
    for a, b in zip(idx.search(q, 10, rerank=False), ref.search(q, 10, rerank=False)):
        np.testing.assert_array_equal(a, b)


def test_bad_settings_are_refused(data, tmp_path: Path) -> None:  # noqa: ANN001
    path, _, _ = data
    with pytest.raises(DiskIndexError, match="does not divide"):
        build_disk_index(NpyRows(path), N, DIM, tmp_path / "a", DiskIndexSettings(pq_m=5))
    with pytest.raises(DiskIndexError, match="cannot train"):
        build_disk_index(NpyRows(path), 100, DIM, tmp_path / "b", DiskIndexSettings(nlist=64))
    with pytest.raises(DiskIndexError, match="unknown metric"):
        build_disk_index(NpyRows(path), N, DIM, tmp_path / "c", DiskIndexSettings(metric="manhattan"))
    with pytest.raises(DiskIndexError, match="no on-disk index"):
        DiskIndex.open(tmp_path / "nothing")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(3, dtype=np.float32))
    with pytest.raises(DiskIndexError, match=r"expected a C-ordered float \(n, dim\)"):
        NpyRows(bad)
