"""An index for more images than RAM holds: IVF-PQ with OPQ on FAISS on-disk inverted lists,
built from a stream of vectors, searched through a memory map, re-ranked exactly where the
vectors are kept.

The build never holds the database in memory (the FAISS demo ``demo_ondisk_ivf.py`` is the
pattern; Jegou, Douze and Schmid, IEEE TPAMI 2011, for IVF-PQ; Ge et al., CVPR 2013, for OPQ):

1. **train** an empty index (``OPQ{m},IVF{nlist}_HNSW32,PQ{m}``) on a seeded sample of the
   stream: the OPQ rotation, the coarse k-means and the product quantiser;
2. **encode** the stream in shards of ``shard_size`` rows, each into its own small index file
   (``shards/shard-00012.index``, written atomically): shards are independent, so they run in
   parallel (worker processes, or Ray tasks with ``engine="ray"``), and a build that stops resumes
   at the first missing shard;
3. **merge** the shards' inverted lists into one file (``lists.ivfdata``,
   ``faiss.OnDiskInvertedLists``) beside the index (``index.faiss``), and delete the shards.

At search time the inverted lists are memory-mapped (``IO_FLAG_ONDISK_SAME_DIR``): RAM holds the
coarse quantiser and the rotation, and the pages of the lists a query visits. With the vectors
(a ``.npy`` file, also memory-mapped), the ``refine_factor * k`` best PQ candidates are re-ranked
by exact distance. Distances are those of :class:`~landlens.retrieval.index.SearchIndex`
(``1 - cos`` for cosine, L2 for euclidean).

Folder layout::

    OUT/
      index.faiss      trained quantisers + the on-disk lists' directory
      lists.ivfdata    the inverted lists (PQ codes and ids)
      disk_index.json  settings, sizes, timings
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landlens.atomic import atomic_path, atomic_write_json
from landlens.errors import LandlensError, first_line
from landlens.retrieval.faisskit import METRICS, default_pq_m, faiss_module, set_ivf_probes

INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
META_FILE = "disk_index.json"
TRAINED_FILE = "trained.index"
SHARDS = "shards"
OPQ_ITERATIONS = 25
READ_BLOCK = 65536
"""Rows read from the stream at a time (a shard is encoded block by block)."""


class DiskIndexError(LandlensError):
    """A bad setting, a missing or damaged on-disk index folder."""


Source = Callable[[int, int], np.ndarray]
"""Rows ``start:stop`` of the database as a float32 ``(stop - start, dim)`` array."""


class NpyRows:
    """Rows of a ``.npy`` file of ``(n, dim)`` vectors, read with plain file reads (no memory map,
    so a stream over a file larger than RAM leaves nothing resident); picklable, so worker
    processes and Ray tasks read their own shards."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise DiskIndexError(f"cannot read vectors {path}: {first_line(exc)}") from None
        if len(shape) != 2 or fortran or dtype.kind != "f":
            raise DiskIndexError(f"vectors {path}: expected a C-ordered float (n, dim) array, got {dtype} {shape}")
        self.n, self.dim = int(shape[0]), int(shape[1])
        self.dtype = dtype

    def __call__(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dim * self.dtype.itemsize)
            x = np.fromfile(f, dtype=self.dtype, count=(stop - start) * self.dim)
        return x.reshape(stop - start, self.dim).astype(np.float32, copy=False)


@dataclass(frozen=True)
class DiskIndexSettings:
    """How the index is built and searched.

    ``nlist``: inverted lists (default about ``4 sqrt(n)`` rounded to a power of two, at most
    65,536); ``pq_m``: bytes per PQ code (default :func:`~landlens.retrieval.index.default_pq_m`);
    ``opq``: learn a rotation before PQ; ``train_size``: vectors sampled to train (default
    ``max(20 * nlist, 65536)``, at most the database); ``shard_size``: rows per encoded shard;
    ``nprobe``: lists visited per query; ``refine_factor``: PQ candidates per wanted hit
    re-ranked exactly when the vectors are given; ``seed``: sample and k-means seed.
    """

    metric: str = "cosine"
    nlist: int | None = None
    pq_m: int | None = None
    opq: bool = True
    train_size: int | None = None
    shard_size: int = 1_000_000
    nprobe: int = 32
    refine_factor: int = 10
    seed: int = 0

    def resolved(self, n: int, dim: int) -> "DiskIndexSettings":
        if self.metric not in METRICS:
            raise DiskIndexError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        nlist = self.nlist or int(min(65536, 2 ** round(np.log2(max(4 * np.sqrt(max(n, 1)), 1)))))
        m = self.pq_m or default_pq_m(dim)
        if dim % m:
            raise DiskIndexError(f"pq_m={m} does not divide the dimension {dim}")
        train = min(n, self.train_size or max(20 * nlist, 65536))
        if train < max(nlist, 256):
            raise DiskIndexError(f"{n} vectors cannot train {nlist} lists; use a smaller nlist or an in-RAM index")
        for name in ("shard_size", "nprobe", "refine_factor"):
            if int(getattr(self, name)) < 1:
                raise DiskIndexError(f"{name} must be a positive integer")
        return DiskIndexSettings(self.metric, int(nlist), int(m), self.opq, int(train), int(self.shard_size),
                                 int(self.nprobe), int(self.refine_factor), int(self.seed))

    def factory(self, dim: int) -> str:
        assert self.nlist is not None and self.pq_m is not None
        return f"{f'OPQ{self.pq_m},' if self.opq else ''}IVF{self.nlist}_HNSW32,PQ{self.pq_m}x8np"


@contextlib.contextmanager
def _quiet_stdout() -> Any:
    """Send what C code prints to standard output to /dev/null (FAISS's on-disk lists print their
    file names when they are opened or resized, which would corrupt a command's JSON output)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """A float32 copy of ``x`` (never the caller's memory: a memory map may be read-only), unit
    rows for the cosine metric."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        faiss_module().normalize_L2(x)
    return x


def _sample(read: Source, n: int, size: int, seed: int, block: int = READ_BLOCK) -> np.ndarray:
    """``size`` rows chosen uniformly at random (seeded), read block by block in order."""
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    out = []
    for start in range(0, n, block):
        pick = rows[(rows >= start) & (rows < start + block)]
        if pick.size:
            out.append(read(start, min(n, start + block))[pick - start])
    return np.concatenate(out)


def _encode_shard(trained: str, out: str, read: Source, start: int, stop: int, metric: str) -> str:
    """Encode rows ``start:stop`` into a copy of the trained index written to ``out``."""
    faiss = faiss_module()
    index = faiss.read_index(trained)
    for a in range(start, stop, READ_BLOCK):
        b = min(stop, a + READ_BLOCK)
        index.add_with_ids(_prepare(read(a, b), metric), np.arange(a, b, dtype=np.int64))
    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
    return out


def build_disk_index(read: Source, n: int, dim: int, out: str | os.PathLike[str],
                     settings: DiskIndexSettings | None = None, *, workers: int = 1, engine: str = "local",
                     progress: bool = False) -> "DiskIndex":
    """Build the on-disk index of ``n`` ``dim``-dimensional vectors streamed by ``read`` into the
    folder ``out`` (module docstring). ``read`` must be picklable for ``workers > 1`` (a
    module-level function or :func:`functools.partial`), and importable on every node for
    ``engine="ray"`` (the shards run as Ray tasks of ``shard_size`` rows).

    A folder holding a finished index is refused; one holding a build that stopped is resumed
    (the trained index and finished shards are kept, when the settings are the same).
    """
    s = (settings or DiskIndexSettings()).resolved(n, dim)
    outp = Path(out)
    meta_path = outp / META_FILE
    want = {"settings": asdict(s), "n": n, "dim": dim, "factory": s.factory(dim)}
    if (outp / INDEX_FILE).exists():
        raise DiskIndexError(f"{outp} already holds an on-disk index; choose another folder or delete it")
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        if {k: have.get(k) for k in want} != want:
            raise DiskIndexError(f"{outp} holds an unfinished build with other settings; delete it to start over")
    outp.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, {**want, "state": "building"})
    faiss = faiss_module()
    times: dict[str, float] = {}
    trained = outp / TRAINED_FILE
    if not trained.exists():
        t0 = time.perf_counter()
        index = faiss.index_factory(dim, s.factory(dim), faiss.METRIC_L2)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = s.seed
        ivf.cp.min_points_per_centroid = 5
        if s.opq:  # half FAISS's default rotation iterations: the training is the longest phase
            faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = OPQ_ITERATIONS
        sample = _prepare(_sample(read, n, s.train_size, s.seed), s.metric)
        index.train(sample)
        with atomic_path(trained) as tmp:
            faiss.write_index(index, str(tmp))
        times["train_seconds"] = time.perf_counter() - t0
    shard_dir = outp / SHARDS
    shard_dir.mkdir(exist_ok=True)
    bounds = [(a, min(n, a + s.shard_size)) for a in range(0, n, s.shard_size)]
    names = [str(shard_dir / f"shard-{i:05d}.index") for i in range(len(bounds))]
    todo = [(name, a, b) for name, (a, b) in zip(names, bounds) if not Path(name).exists()]
    t0 = time.perf_counter()
    _encode_all(str(trained), todo, read, s.metric, workers, engine, progress)
    times["encode_seconds"] = time.perf_counter() - t0
    times["shards_encoded"] = len(todo)
    t0 = time.perf_counter()
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(trained))
    lists = outp / LISTS_FILE
    if lists.exists():
        lists.unlink()  # a merge that stopped: redone from the shards
    with _quiet_stdout():
        merge_ondisk(index, names, str(lists))
    with atomic_path(outp / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    times["merge_seconds"] = time.perf_counter() - t0
    shutil.rmtree(shard_dir)
    trained.unlink()
    atomic_write_json(meta_path, {**want, "state": "done", "ntotal": int(index.ntotal), **{
        k: round(v, 3) for k, v in times.items()}, "index_bytes": (outp / INDEX_FILE).stat().st_size,
        "lists_bytes": lists.stat().st_size})
    del index
    return DiskIndex.open(outp)


def _encode_all(trained: str, todo: list[tuple[str, int, int]], read: Source, metric: str, workers: int,
                engine: str, progress: bool) -> None:
    if engine == "ray":
        from landlens.features.ray_engine import connect

        ray = connect(None)
        task = ray.remote(num_cpus=1)(_encode_shard)
        refs = [task.remote(trained, name, read, a, b, metric) for name, a, b in todo]
        for ref in _progress(refs, progress):
            ray.get(ref)
        return
    if engine != "local":
        raise DiskIndexError(f"unknown engine {engine!r}: use local or ray")
    if workers <= 1:
        for name, a, b in _progress(todo, progress):
            _encode_shard(trained, name, read, a, b, metric)
        return
    import multiprocessing

    # spawned, not forked: FAISS's OpenMP threads (used by the training) do not survive a fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_encode_shard, trained, name, read, a, b, metric) for name, a, b in todo]
        for f in _progress(futures, progress):
            f.result()


def _progress(items: list, on: bool) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc="encoding shards", unit="shard", disable=not on)


class DiskIndex:
    """A built on-disk index, opened with its inverted lists memory-mapped (:meth:`open`)."""

    def __init__(self, folder: Path, index: Any, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.index_ = index
        self.meta = meta
        self.settings = DiskIndexSettings(**meta["settings"])
        self.nprobe = self.settings.nprobe
        self.refine_factor = self.settings.refine_factor
        self.vectors: Any = None
        self.bytes = sum(p.stat().st_size for p in (folder / INDEX_FILE, folder / LISTS_FILE))

    @classmethod
    def open(cls, folder: str | os.PathLike[str], vectors: str | os.PathLike[str] | Any = None) -> "DiskIndex":
        """Open the index in ``folder``; ``vectors`` (the database as a ``.npy`` file, memory-mapped,
        or anything with ``shape`` that gathers rows by an array of ids; row i = id i) turns on the
        exact re-ranking of the shortlist."""
        d = Path(folder)
        try:
            meta = json.loads((d / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DiskIndexError(f"no on-disk index at {d}: {first_line(exc)}") from None
        if meta.get("state") != "done":
            raise DiskIndexError(f"the on-disk index at {d} is not finished; run the build again to resume it")
        faiss = faiss_module()
        try:
            with _quiet_stdout():
                index = faiss.read_index(str(d / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError as exc:
            raise DiskIndexError(f"cannot read {d / INDEX_FILE}: {first_line(exc)}") from None
        self = cls(d, index, meta)
        if vectors is not None:
            self.use_vectors(np.load(vectors, mmap_mode="r") if isinstance(vectors, (str, os.PathLike)) else vectors)
        return self

    def use_vectors(self, vectors: Any) -> None:
        """Re-rank the shortlist by exact distances to ``vectors`` (row i = id i; a memory map, or
        anything with ``shape`` that gathers rows by an array of ids)."""
        if tuple(vectors.shape) != (self.index_.ntotal, self.index_.d):
            raise DiskIndexError(f"vectors of shape {tuple(vectors.shape)} for an index of "
                                 f"{self.index_.ntotal} x {self.index_.d}")
        self.vectors = vectors

    @property
    def ntotal(self) -> int:
        return int(self.index_.ntotal)

    def disk_bytes(self) -> int:
        """Bytes of the index and list files (when opened)."""
        return self.bytes

    def search(self, queries: Any, k: int, *, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, ids)`` (nq, k), nearest first; PQ distances, or exact ones after the
        re-ranking of ``refine_factor * k`` candidates when the vectors are known and ``rerank``."""
        q = _prepare(np.atleast_2d(np.asarray(queries, dtype=np.float32)), self.settings.metric)
        set_ivf_probes(self.index_, self.nprobe)
        exact = rerank and self.vectors is not None
        sq, ids = self.index_.search(q, int(k) * (self.refine_factor if exact else 1))
        if exact:
            sq = np.full(ids.shape, np.inf, dtype=np.float32)
            for qi in range(len(q)):
                ok = ids[qi] >= 0
                rows = ids[qi][ok]
                order = np.argsort(rows)
                x = _prepare(np.asarray(self.vectors[rows[order]]), self.settings.metric)
                d = np.empty(len(rows), dtype=np.float32)
                d[order] = ((x - q[qi]) ** 2).sum(axis=1)
                sq[qi][ok] = d
            best = np.argsort(sq, axis=1, kind="stable")[:, :k]
            sq, ids = np.take_along_axis(sq, best, 1), np.take_along_axis(ids, best, 1)
        sq = np.maximum(sq, 0)
        dist = (sq * 0.5 if self.settings.metric == "cosine" else np.sqrt(sq)).astype(np.float32)
        dist[ids < 0] = np.inf
        return dist, ids.astype(np.int64)


__all__ = ["DiskIndex", "DiskIndexError", "DiskIndexSettings", "NpyRows", "Source", "build_disk_index"]
