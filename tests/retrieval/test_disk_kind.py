"""The on-disk IVF-PQ index as a kind of :class:`SearchIndex` and of archives: ``kind='auto'``
switches to it where IVF-Flat would not fit in RAM, its re-ranked search against a NumPy brute
force, save/load by hard links, its build folder's life, and an archive whose segment is on disk."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fixtures.archives import template_archive
from fixtures.neighbours import cosine_top_k
from landlens.cli.main import cli
from landlens.retrieval import index as index_mod
from landlens.retrieval.archive import Archive
from landlens.retrieval.index import SearchIndex, SearchIndexError, auto_kind

N, DIM = 6_000, 32


def _data(n: int = N, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    x = (centres[rng.integers(0, 30, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    q = (centres[rng.integers(0, 30, 25)] + 0.3 * rng.normal(size=(25, dim))).astype(np.float32)
    return x, q


def _recall(found: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(w)) / len(w) for f, w in zip(found, want)]))


def test_auto_switches_where_ivf_flat_exceeds_the_ram_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "ram_bytes", lambda: 4_000_000_000)  # a quarter: 1e9 bytes
    assert auto_kind(1_000_000, 256) == "ivf-pq-disk"  # 1.024e9 bytes of float32
    assert auto_kind(1_000_000, 128) == "ivf-flat"  # 0.512e9
    assert auto_kind(976_562, 256) == "ivf-flat"  # 999,999,488 bytes: not past the share
    assert auto_kind(976_563, 256) == "ivf-pq-disk"
    assert auto_kind(49_999, 10**6) == "exact"  # below AUTO_EXACT_MAX the size never matters
    assert SearchIndex().resolve_kind(1_000_000, 256) == "ivf-pq-disk"
    assert SearchIndex().factory_string(1_000_000, 256) == "OPQ32,IVF4096_HNSW32,PQ32x8np"


def test_disk_kind_search_matches_a_brute_force_and_survives_save_and_load(tmp_path: Path) -> None:
    x, q = _data()
    index = SearchIndex("ivf-pq-disk", nlist=32, nprobe=32, refine_factor=20).fit(x, scratch=tmp_path / "scratch")
    assert index.kind_ == "ivf-pq-disk" and index.factory_ == "OPQ4,IVF32_HNSW32,PQ4x8np"
    want_d, want_i = cosine_top_k(x, q, 10)
    d, i = index.search(q, 10)
    assert _recall(i, want_i) >= 0.97
    # the returned distances are the exact 1 - cos of the returned rows
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(d, 1.0 - np.einsum("qd,qkd->qk", qn, xn[i]), atol=2e-5)
    saved = index.save(tmp_path / "saved")
    lists = saved / "lists.ivfdata"
    assert os.stat(lists).st_ino == os.stat(index.disk_.folder / "lists.ivfdata").st_ino  # linked, not copied
    assert index.index_bytes() == os.stat(lists).st_size + os.stat(saved / "index.faiss").st_size
    loaded = SearchIndex.load(saved)
    assert loaded.kind_ == "ivf-pq-disk" and loaded.ntotal == N
    _, pq_only = loaded.search(q, 10)  # no vectors attached: the PQ codes' ranking
    loaded.use_vectors(np.load(_saved_vectors(tmp_path, x), mmap_mode="r"))
    d2, i2 = loaded.search(q, 10)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_allclose(d2, d, atol=1e-6)
    assert _recall(pq_only, want_i) < _recall(i2, want_i)
    with pytest.raises(SearchIndexError, match="not extended in place"):
        loaded.add(x[:3])


def _saved_vectors(tmp_path: Path, x: np.ndarray) -> Path:
    path = tmp_path / "vectors.npy"
    np.save(path, x)
    return path


def test_the_build_folder_lives_as_long_as_the_index(tmp_path: Path) -> None:
    x, _ = _data(3_000)
    index = SearchIndex("ivf-pq-disk", nlist=16).fit(x, scratch=tmp_path)
    build = index.disk_.folder.parent
    assert build.parent == tmp_path and build.name.startswith(".disk-index-")
    saved = index.save(tmp_path / "saved")
    del index
    gc.collect()
    assert not build.exists()  # the build is gone, the saved index keeps its (linked) files
    assert SearchIndex.load(saved).ntotal == 3_000


def test_disk_kind_refuses_bad_rows_before_training(tmp_path: Path) -> None:
    x, _ = _data(3_000)
    x[1234] = 0.0
    with pytest.raises(SearchIndexError, match="all-zero row.*row 1234"):
        SearchIndex("ivf-pq-disk", nlist=16).fit(x, scratch=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was built
    with pytest.raises(SearchIndexError, match="cannot train"):
        SearchIndex("ivf-pq-disk", nlist=512).fit(x[:300], scratch=tmp_path)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return template_archive(tmp_path_factory, "disk", ["a", "b", "c"], per_class=100, size=24)


def test_an_archive_on_the_disk_kind_searches_its_memory_mapped_vectors(template: Path, tmp_path: Path) -> None:
    arch = Archive.open(template)
    x = np.asarray(arch._state.vectors, dtype=np.float32)
    Archive.from_store(arch.meta["feature_store"], tmp_path / "disk", index_factory="ivf-pq-disk", nlist=16,
                       nprobe=16, refine_factor=30)
    gc.collect()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".disk-index-")]  # the build folder is gone
    disk = Archive.open(tmp_path / "disk")
    assert disk.info()["index"]["kind"] == "ivf-pq-disk"
    seg = disk._state.segments[0]
    assert isinstance(seg.vectors, np.memmap) and seg.index.disk_.vectors is seg.vectors
    assert (tmp_path / "disk" / seg.path / "index" / "lists.ivfdata").is_file()
    _, want = cosine_top_k(x, x[:20], 10)
    found = np.array([[h.record.id for h in hits] for hits in disk.search_vectors(x[:20], 10)])
    assert _recall(found, want) >= 0.97
    # an addition is a small exact segment beside the on-disk one; a full compaction rebuilds on disk
    new = tmp_path / "extra.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(new)
    disk.add([new], ["a"])
    assert [s.index.kind_ for s in disk._state.segments] == ["ivf-pq-disk", "exact"]
    assert disk.compact()
    assert [s.index.kind_ for s in disk._state.segments] == ["ivf-pq-disk"] and len(disk) == len(x) + 1


def test_the_cli_builds_a_disk_archive_and_its_json_stays_clean(template: Path, tmp_path: Path) -> None:
    store = Archive.open(template).meta["feature_store"]
    res = CliRunner().invoke(cli, ["retrieval", "index", store, "--out", str(tmp_path / "a"), "--kind", "ivf-pq-disk",
                                   "--nprobe", "16", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)  # FAISS's own prints about its list file do not reach stdout
    assert info["index"]["kind"] == "ivf-pq-disk" and info["images"] == 300
    # in a process of its own, so that what C code writes to file descriptor 1 is seen too
    proc = subprocess.run([sys.executable, "-c", "from landlens.cli.main import main; main()", "index", "info",
                           str(tmp_path / "a"), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["index"]["bytes"] > 0
