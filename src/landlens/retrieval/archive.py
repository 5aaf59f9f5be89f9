"""A persistent, updatable search archive: FAISS index + image catalog (SQLite) on disk.

An archive folder holds everything a search service needs to answer queries by example::

    ARCHIVE/
      CURRENT              name of the live generation (replaced atomically)
      gen-00000003/        the live generation, never modified once written:
        index/             the FAISS index (:class:`~landlens.retrieval.index.SearchIndex` folder);
                           its meta records the extractor (backbone, weights digest, preprocessing)
        vectors.npy        (n, dim) float32 features, row i = FAISS row i
        catalog.sqlite     one row per image: id, row, path, class, width, height, sha256, bytes, added
        generation.json    generation number, image count, next id, parent generation
      features/            the feature store extracted at build time (reused by a rebuild)
      uploads/             images added through the service, named by their sha256
      .lock                serialises writers across processes (``fcntl.flock``)
      .readers             readers hold it shared while loading a generation; the writer's
                           clean-up holds it exclusive, so a load never sees its files vanish

Every update (:meth:`Archive.add`, :meth:`Archive.remove`, a rebuild over an existing archive)
writes a complete new generation beside the live one, flushes it to disk, and only then
replaces ``CURRENT`` with a rename. A crash at any point leaves ``CURRENT`` naming a complete
generation: the previous one until the rename, the new one after it. Left-over partial
generations are ignored on open and deleted by the next update, as are uploaded files that
no live image references (an upload stored by an update that crashed before its commit).
Readers load under a shared lock (``.readers``) that the clean-up takes exclusively, so a
reader that read ``CURRENT`` just before a writer committed still loads the generation it
named; once loaded, a generation needs none of its files but ``vectors.npy``, which stays
readable through its memory map after deletion.

Image ids are stable integers that are never reused; FAISS rows are positions in
``vectors.npy`` and change when images are removed. Adding appends to a copy of the live
index (no retraining); removing rebuilds the index over the remaining vectors with the same
settings (IVF kinds are retrained), so its cost grows with the archive.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from landlens.data.io import file_problem
from landlens.errors import ImageReadError, LandlensError, first_line
from landlens.features.store import atomic_write_bytes

FORMAT_VERSION = 1
CURRENT = "CURRENT"
GEN_PREFIX = "gen-"
LOCK = ".lock"
UPLOADS = "uploads"
FEATURES = "features"
READERS = ".readers"

_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    row INTEGER NOT NULL UNIQUE,
    path TEXT NOT NULL,
    class TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    added TEXT NOT NULL
);
CREATE INDEX images_sha256 ON images(sha256);
CREATE INDEX images_class ON images(class);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


UPLOAD_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}
"""File suffix of an uploaded image kept in ``uploads/``, by format."""

CLASS_NAME_LIMIT = 200
"""Longest class name an archive accepts (characters)."""


class ArchiveError(LandlensError):
    """A user error about an archive: a missing or damaged folder, an unknown id, a bad update."""


def validate_class_name(name: str | None) -> str | None:
    """A class name as archives store it: surrounding space stripped, ``None`` or ``""`` for
    none; refused (:class:`ArchiveError`) when longer than :data:`CLASS_NAME_LIMIT` characters
    or holding a character that is not printable (a control character, a newline)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ArchiveError(f"bad class name {name!r}: not text")
    name = name.strip()
    if not name:
        return None
    if len(name) > CLASS_NAME_LIMIT or not name.isprintable():
        raise ArchiveError(f"bad class name {name[:60]!r}: use printable text of at most "
                           f"{CLASS_NAME_LIMIT} characters")
    return name


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image. ``path`` is the server-side file and is never part of :meth:`to_dict`."""

    id: int
    path: str
    name: str
    class_name: str | None
    width: int
    height: int
    sha256: str
    bytes: int
    added: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "class": self.class_name, "width": self.width,
                "height": self.height, "sha256": self.sha256, "bytes": self.bytes, "added": self.added}


@dataclass(frozen=True)
class ArchiveHit:
    """One search result: rank (1-based), the image, its distance and a similarity score.

    ``score`` is higher for more similar images: the cosine similarity (``1 - distance``) under
    the cosine metric, ``1 / (1 + distance)`` under the Euclidean one. With a re-ranker
    (:meth:`Archive.set_rerank`) ``distance`` is the re-ranked one (its order is the ranking)
    and ``score`` stays the plain cosine similarity of the query and the image.
    """

    rank: int
    record: ImageRecord
    distance: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {"rank": self.rank, "id": r.id, "name": r.name, "class": r.class_name, "width": r.width,
                "height": r.height, "distance": self.distance, "score": self.score}


@dataclass
class _State:
    """One loaded generation (immutable once published; updates build a new one)."""

    generation: int
    index: Any  # SearchIndex
    vectors: np.ndarray
    records: list[ImageRecord]  # in row order
    next_id: int
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self.row_of = {r.id: i for i, r in enumerate(self.records)}
        self.id_of_sha = {}
        for r in self.records:
            self.id_of_sha.setdefault(r.sha256, r.id)
        self.classes = np.array([r.class_name or "" for r in self.records], dtype=object)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _describe_file(path: Path) -> tuple[int, int, str, int]:
    """(width, height, sha256, bytes) of an image file (header only: no decoding)."""
    from landlens.data.io import probe_image

    info = probe_image(path)
    sha, size = _sha256(path)
    return info.width, info.height, sha, size


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(p)
    _fsync_dir(path)


@contextlib.contextmanager
def _file_lock(directory: Path, name: str = LOCK, shared: bool = False) -> Iterator[None]:
    """``fcntl.flock`` on ``directory/name``: exclusive (one writer at a time) or shared.

    A shared lock on a folder this process may not write (a read-only archive, which no writer
    can change either) is skipped.
    """
    import fcntl

    if not shared:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        f = open(directory / name, "a+b")
    except OSError:
        if not shared:
            raise
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load_current(directory: Path) -> _State | None:
    """The live generation, loaded under the shared readers' lock (``None``: no ``CURRENT``)."""
    with _file_lock(directory, READERS, shared=True):
        name = _read_current(directory)
        return None if name is None else _load_state(directory, name)


def _gen_name(n: int) -> str:
    return f"{GEN_PREFIX}{n:08d}"


def _read_current(directory: Path) -> str | None:
    try:
        name = (directory / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArchiveError(f"archive {directory}: cannot read {CURRENT}: {first_line(exc)}") from None
    if not name.startswith(GEN_PREFIX) or "/" in name or not name[len(GEN_PREFIX):].isdigit():
        raise ArchiveError(f"archive {directory}: {CURRENT} names {name[:40]!r}, not a generation")
    return name


def is_archive(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds an archive (a ``CURRENT`` pointer)."""
    return (Path(directory) / CURRENT).is_file()


def _load_state(directory: Path, name: str) -> _State:
    from landlens.retrieval.index import SearchIndex, SearchIndexError

    gen = directory / name
    try:
        doc = json.loads((gen / "generation.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"archive {directory}: generation {name} is unreadable: {first_line(exc)}") from None
    if doc.get("format") != FORMAT_VERSION:
        raise ArchiveError(f"archive {directory} has format {doc.get('format')}, expected {FORMAT_VERSION}")
    try:
        index = SearchIndex.load(gen / "index")
    except SearchIndexError as exc:
        raise ArchiveError(f"archive {directory}: {exc}") from None
    try:
        vectors = np.load(gen / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"archive {directory}: cannot read {name}/vectors.npy: {first_line(exc)}") from None
    try:
        con = sqlite3.connect(f"file:{gen / 'catalog.sqlite'}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT id, row, path, class, width, height, sha256, bytes, added "
                               "FROM images ORDER BY row").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ArchiveError(f"archive {directory}: cannot read {name}/catalog.sqlite: {first_line(exc)}") from None
    records = [ImageRecord(int(i), p, Path(p).name, c, int(w), int(h), s, int(b), a)
               for i, _r, p, c, w, h, s, b, a in rows]
    if not (len(records) == vectors.shape[0] == index.ntotal == int(doc.get("images", -1))):
        raise ArchiveError(f"archive {directory}: generation {name} is inconsistent ({len(records)} catalog rows, "
                           f"{vectors.shape[0]} vectors, {index.ntotal} indexed); rebuild it")
    if [int(row[1]) for row in rows] != list(range(len(rows))):
        raise ArchiveError(f"archive {directory}: generation {name} has gaps in its catalog rows; rebuild it")
    return _State(int(doc["generation"]), index, vectors, records, int(doc["next_id"]), dict(doc.get("meta") or {}))


def _write_generation(directory: Path, state: _State, parent: int | None) -> None:
    """Write ``state`` as generation ``state.generation`` and make it current (atomic)."""
    name = _gen_name(state.generation)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=directory))
    try:
        state.index.save(tmp / "index")
        with open(tmp / "vectors.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(state.vectors, dtype=np.float32))
        con = sqlite3.connect(tmp / "catalog.sqlite")
        try:
            con.executescript(_SCHEMA)
            con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(r.id, i, r.path, r.class_name, r.width, r.height, r.sha256, r.bytes, r.added)
                             for i, r in enumerate(state.records)])
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v, sort_keys=True)) for k, v in state.meta.items()])
            con.commit()
        finally:
            con.close()
        doc = {"format": FORMAT_VERSION, "generation": state.generation, "parent": parent,
               "images": len(state.records), "next_id": state.next_id, "written": _now(), "meta": state.meta}
        (tmp / "generation.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        final = directory / name
        if final.exists():  # a partial generation of a crashed update that got this far
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_generation(directory, name)


def commit_generation(directory: Path, name: str) -> None:
    """Make the complete generation folder ``name`` the live one: replace ``CURRENT`` atomically."""
    atomic_write_bytes(directory / CURRENT, (name + "\n").encode())
    _fsync_dir(directory)


def _collect_garbage(directory: Path, state: _State) -> None:
    """Delete every generation and temporary folder but the live one, and uploaded files no
    live image references (writers call it holding the writer's lock)."""
    keep = _gen_name(state.generation)
    with _file_lock(directory, READERS):  # waits for readers loading an older generation
        for p in directory.iterdir():
            stale_gen = p.name.startswith(GEN_PREFIX) and p.name != keep
            stale_tmp = p.name.startswith(f".{GEN_PREFIX}") and p.name.endswith(".tmp")
            if (stale_gen or stale_tmp) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        uploads = directory / UPLOADS
        if uploads.is_dir():
            for p in uploads.iterdir():  # named <sha256><suffix>, or .<name>.part while copied
                if p.name.startswith(".") or p.stem not in state.id_of_sha:
                    with contextlib.suppress(OSError):
                        p.unlink()


class Archive:
    """An on-disk archive of indexed images that can be searched and updated (module docstring).

    Open one with :meth:`open` or create one with :meth:`build`. Searches and record lookups
    may run from many threads at once; :meth:`add` and :meth:`remove` are serialised (also
    across processes) and publish their result at the end, so readers see the old or the new
    archive, never a mixture.
    """

    def __init__(self, directory: Path, state: _State) -> None:
        self.directory = Path(directory)
        self._state = state
        self._write_lock = threading.Lock()
        self._backbone_lock = threading.Lock()
        self._backbone: Any = None
        self._fast: Any = None  # a prepared forward pass of the backbone (:meth:`optimize`)
        self._rerank_spec: str | None = None
        self._rerank_lock = threading.Lock()
        self._reranker: tuple[int, Any] | None = None  # (generation, fitted re-ranker)

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> "Archive":
        """Load the live generation of the archive in ``directory``."""
        d = Path(directory)
        if not d.is_dir():
            raise ArchiveError(f"no archive at {d} (not a folder)")
        state = _load_current(d)
        if state is None:
            raise ArchiveError(f"no archive at {d} (missing {CURRENT}); create one with `landlens index build`")
        return cls(d, state)

    @classmethod
    def build(cls, data: str | os.PathLike[str], out: str | os.PathLike[str], *, dataset: str | None = None,
              backbone: str = "tf_efficientnet_lite0", weights: str = "auto", index_factory: str = "auto",
              metric: str = "cosine", cache_dir: str | os.PathLike[str] | None = None, workers: int | None = None,
              progress: bool = True, overwrite: bool = False) -> "Archive":
        """Index every readable image of the class-folder dataset ``data`` into a new archive ``out``.

        Features come from ``backbone`` (with ``weights``) through a feature store in
        ``cache_dir`` (default ``out/features``; an existing store of the same images and
        extractor is reused); classes are the sub-folder names. ``index_factory`` is any
        :class:`~landlens.retrieval.index.SearchIndex` kind or FAISS factory string. An existing
        archive at ``out`` is refused unless ``overwrite``, which replaces it atomically.
        """
        from landlens.data.folder import scan_folder
        from landlens.features.cache import cached_features, store_path
        from landlens.models.registry import create_backbone
        from landlens.retrieval.index import build_index_from_store

        outp = Path(out)
        if outp.exists() and not outp.is_dir():
            raise ArchiveError(f"{outp} exists and is not a folder; choose another --out")
        if outp.is_dir() and not is_archive(outp) and any(p.name not in (FEATURES, LOCK) for p in outp.iterdir()):
            raise ArchiveError(f"{outp} exists and is not an archive folder; choose another --out")
        if is_archive(outp) and not overwrite:
            raise ArchiveError(f"{outp} already holds an archive; use --overwrite to rebuild it, "
                               f"or `landlens index add` to add images")
        ds = scan_folder(data, dataset)
        bb = create_backbone(backbone, weights)
        cache = Path(cache_dir) if cache_dir is not None else outp / FEATURES
        fs = cached_features(data, dataset, bb, cache_dir=cache, workers=workers, progress=progress,
                             command="landlens index build")
        store_dir = store_path(cache, ds.name, ds.paths, ds.labels, bb)
        index = build_index_from_store(store_dir, kind=index_factory, metric=metric)
        index.paths_ = index.labels_ = index.classes_ = None  # the catalog names the rows
        root = Path(fs.meta["dataset"]["root"])
        files = [root / p for p in fs.paths]
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            described = list(pool.map(_describe_file, files))
        added = _now()
        records = [ImageRecord(i, str(f), f.name, fs.classes[int(y)], w, h, s, n, added)
                   for i, (f, y, (w, h, s, n)) in enumerate(zip(files, fs.labels, described))]
        meta = {"data_root": str(root), "dataset": ds.name, "created": added,
                "feature_store": str(Path(store_dir).resolve()), "classes": list(fs.classes)}
        with _file_lock(outp):
            old = _read_current(outp)
            gen = int(old[len(GEN_PREFIX):]) + 1 if old else 1
            state = _State(gen, index, np.asarray(fs.features, dtype=np.float32), records, len(records), meta)
            _write_generation(outp, state, int(old[len(GEN_PREFIX):]) if old else None)
            _collect_garbage(outp, state)
        return cls.open(outp)

    def reload(self) -> bool:
        """Load a newer generation written by another process; ``True`` when one was loaded."""
        name = _read_current(self.directory)
        if name is None or int(name[len(GEN_PREFIX):]) == self._state.generation:
            return False
        with self._write_lock:
            state = _load_current(self.directory)
            if state is None or state.generation == self._state.generation:
                return False
            self._state = state
        return True

    # ------------------------------------------------------------------ describing
    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def index(self) -> Any:
        """The live :class:`~landlens.retrieval.index.SearchIndex` (do not modify it)."""
        return self._state.index

    @property
    def metric(self) -> str:
        return self._state.index.metric

    @property
    def dim(self) -> int:
        return int(self._state.index.dim_)

    @property
    def factory(self) -> str:
        return self._state.index.factory_

    @property
    def backbone_name(self) -> str:
        return str(self._state.index.meta.get("identity", {}).get("backbone"))

    @property
    def preprocessing(self) -> Any:
        from landlens.models.preprocessing import Preprocessing

        return Preprocessing.from_dict(self._state.index.meta["identity"]["preprocessing"])

    def __len__(self) -> int:
        return len(self._state.records)

    @property
    def classes(self) -> list[str]:
        """Class names of the indexed images, sorted."""
        return sorted({r.class_name for r in self._state.records if r.class_name})

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self._state.records:
            if r.class_name:
                counts[r.class_name] = counts.get(r.class_name, 0) + 1
        return dict(sorted(counts.items()))

    def has(self, id: int) -> bool:
        return int(id) in self._state.row_of

    def record(self, id: int) -> ImageRecord:
        state = self._state
        row = state.row_of.get(int(id))
        if row is None:
            raise ArchiveError(f"no image with id {id} in the archive")
        return state.records[row]

    def records(self) -> list[ImageRecord]:
        """Every record, in index row order."""
        return list(self._state.records)

    def vector(self, id: int) -> np.ndarray:
        state = self._state
        row = state.row_of.get(int(id))
        if row is None:
            raise ArchiveError(f"no image with id {id} in the archive")
        return np.array(state.vectors[row], dtype=np.float32)

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: size, classes, extractor, index, disk use."""
        state = self._state
        meta = state.index.meta
        gen = self.directory / _gen_name(state.generation)
        disk = sum(p.stat().st_size for p in gen.rglob("*") if p.is_file())
        uploads = self.directory / UPLOADS
        return {
            "directory": str(self.directory.resolve()),
            "generation": state.generation,
            "images": len(state.records),
            "next_id": state.next_id,
            "classes": self.class_counts(),
            "unlabelled": sum(1 for r in state.records if not r.class_name),
            "backbone": meta.get("identity", {}).get("backbone"),
            "weights": meta.get("backbone", {}).get("weights"),
            "preprocessing": meta.get("identity", {}).get("preprocessing"),
            "index": {"factory": state.index.factory_, "kind": state.index.kind_, "metric": state.index.metric,
                      "dim": state.index.dim_, "ntotal": state.index.ntotal, "bytes": state.index.index_bytes()},
            "data_root": state.meta.get("data_root"),
            "dataset": state.meta.get("dataset"),
            "feature_store": state.meta.get("feature_store"),
            "created": state.meta.get("created"),
            "updated": state.meta.get("updated", state.meta.get("created")),
            "generation_bytes": disk,
            "uploads": sum(1 for p in uploads.iterdir() if p.stem in state.id_of_sha) if uploads.is_dir() else 0,
        }

    # ------------------------------------------------------------------ embedding and searching
    def backbone(self) -> Any:
        """The archive's feature extractor, rebuilt once from the recorded weights and checked."""
        if self._backbone is None:
            with self._backbone_lock:
                if self._backbone is None:
                    from landlens.retrieval.index import backbone_for_index

                    self._backbone = backbone_for_index(self._state.index).eval()
        return self._backbone

    def load_query(self, path: str | os.PathLike[str], *, max_pixels: int | None = None) -> Any:
        """Decode a query image exactly as the indexed images were decoded (RGB PIL image).

        Raises:
            ImageReadError: the file is missing or not a readable image, or has more than
                ``max_pixels`` pixels (checked on the header before decoding).
        """
        from landlens.data.io import DEFAULT_MAX_PIXELS
        from landlens.models.preprocessing import decode_image

        bands = self._state.index.meta.get("identity", {}).get("rgb_bands")
        return decode_image(path, self.preprocessing, rgb_bands=bands,
                            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)

    def optimize(self, mode: str = "jit") -> str:
        """Prepare a faster forward pass for :meth:`embed` (what a long-running service wants).

        ``mode`` is that of :func:`landlens.features.extract.optimize_for_inference` (``jit``:
        traced, frozen, batch-norm folded, channels-last; ``compile``; ``none``); the prepared
        graph is checked against eager mode on seeded noise images first, and a ``jit`` graph
        that cannot be prepared leaves eager mode in place. Returns the mode in use:
        ``'jit'``, ``'compile'`` or ``'eager'``.
        """
        from landlens.features.extract import noise_batch, optimize_for_inference

        if mode not in ("jit", "compile", "none"):
            raise ArchiveError(f"unknown forward-pass mode {mode!r}: use jit, compile or none")
        bb = self.backbone()
        # 'auto' without an image count is jit with eager as the fallback; 'compile' fails loudly
        import torch

        # traced on the channels-last layout that embed_images gives a prepared graph
        example = noise_batch(bb.preprocessing, 2).contiguous(memory_format=torch.channels_last)
        fast = optimize_for_inference(bb, example, mode="auto" if mode == "jit" else mode)  # type: ignore[arg-type]
        self._fast = None if fast is bb else fast
        return "eager" if self._fast is None else mode

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Features (n, dim) float32 of RGB PIL images under the archive's extractor (the
        prepared forward pass after :meth:`optimize`)."""
        from landlens.retrieval.index import embed_images

        return np.ascontiguousarray(embed_images(self.backbone(), list(images), forward=self._fast), dtype=np.float32)

    def _score(self, distance: float) -> float:
        if not np.isfinite(distance):
            return 0.0
        return float(1.0 - distance) if self.metric == "cosine" else float(1.0 / (1.0 + distance))

    # ------------------------------------------------------------------ re-ranking
    @property
    def rerank(self) -> str | None:
        """The unsupervised re-ranking spec searches use, or ``None`` (plain index search)."""
        return self._rerank_spec

    def set_rerank(self, spec: str | None) -> None:
        """Re-rank every search without labels (:mod:`landlens.retrieval.rerank`: ``"aqe"``,
        ``"diffusion"``, ``"aqe+diffusion"``, ...), fitted now on the archive's vectors and
        again after each update; ``None`` turns it off. Ranks the whole archive per query
        (cost stated by :meth:`rerank_info`); needs the cosine metric."""
        if spec is None:
            self._rerank_spec, self._reranker = None, None
            return
        from landlens.retrieval.rerank import make_reranker

        if self.metric != "cosine":
            raise ArchiveError(f"re-ranking ranks by cosine similarity; this archive uses {self.metric}")
        make_reranker(spec)  # a bad spec is refused before anything changes
        self._rerank_spec, self._reranker = spec, None
        self._fitted_reranker(self._state)

    def _fitted_reranker(self, state: _State) -> Any:
        from landlens.retrieval.rerank import make_reranker

        with self._rerank_lock:
            cached = self._reranker
            if cached is not None and cached[0] == state.generation:
                return cached[1]
            rr = make_reranker(str(self._rerank_spec)).fit(np.asarray(state.vectors, dtype=np.float32))
            self._reranker = (state.generation, rr)
            return rr

    def rerank_info(self) -> dict[str, Any] | None:
        """The live re-ranker's settings, database size and fit time (``None`` when off)."""
        cached = self._reranker
        return None if self._rerank_spec is None or cached is None else cached[1].to_dict()

    def _reranked(self, state: _State, q: np.ndarray, k: int, class_name: str | None,
                  exclude: Sequence[int | None] | None) -> list[list[ArchiveHit]]:
        """Hits ranked by the re-ranker over the whole archive (filters applied after ranking)."""
        import torch

        rr = self._fitted_reranker(state)
        rows = np.array([state.row_of.get(int(x), -1) if x is not None else -1
                         for x in (exclude if exclude is not None else [None] * len(q))], dtype=np.int64)
        dist = rr.distances(q, rows)
        cos = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(q)), dim=1) @ rr.database_.T
        order = torch.sort(dist, dim=1, stable=True).indices.numpy()
        out = []
        for qi in range(len(q)):
            skip = exclude[qi] if exclude is not None else None
            hits: list[ArchiveHit] = []
            for r in order[qi]:
                rec = state.records[int(r)]
                if rec.id == skip or (class_name is not None and rec.class_name != class_name):
                    continue
                hits.append(ArchiveHit(len(hits) + 1, rec, float(dist[qi, r]), float(cos[qi, r])))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search_vectors(self, vectors: Any, k: int, *, class_name: str | None = None,
                       exclude: Sequence[int | None] | None = None) -> list[list[ArchiveHit]]:
        """The ``k`` most similar images of each query vector (fewer when a filter leaves fewer).

        Args:
            vectors: (nq, dim) or (dim,) features from :meth:`embed`.
            k: hits per query (at least 1).
            class_name: keep only images of this class (must be a class of the archive).
            exclude: per query, an image id to leave out (the query itself when it is indexed;
                with a re-ranker, that image's node of the graph is the query's).
        """
        state = self._state
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if isinstance(k, bool) or int(k) < 1:
            raise ArchiveError(f"k must be a positive integer, got {k!r}")
        if exclude is not None and len(exclude) != len(q):
            raise ArchiveError(f"{len(exclude)} exclusions for {len(q)} queries")
        if class_name is not None and class_name not in set(state.classes.tolist()):
            raise ArchiveError(f"class {class_name!r} is not in the archive "
                               f"({', '.join(self.classes) or 'it has no classes'})")
        if self._rerank_spec is not None and len(state.records) >= 2:
            return self._reranked(state, q, int(k), class_name, exclude)
        n = len(state.records)
        eligible = int((state.classes == class_name).sum()) if class_name is not None else n
        out: list[list[ArchiveHit]] = []
        for qi in range(len(q)):
            skip = exclude[qi] if exclude is not None else None
            want = min(int(k), eligible - (1 if skip is not None and self._eligible(skip, class_name) else 0))
            fetch = min(n, int(k) + 1 if class_name is None else max(4 * int(k), 64))
            while True:
                dist, rows = state.index.search(q[qi:qi + 1], fetch)
                hits = []
                for d, r in zip(dist[0], rows[0]):
                    if r < 0:
                        continue
                    rec = state.records[int(r)]
                    if rec.id == skip or (class_name is not None and rec.class_name != class_name):
                        continue
                    hits.append(ArchiveHit(len(hits) + 1, rec, float(d), self._score(float(d))))
                    if len(hits) == want:
                        break
                if len(hits) >= want or fetch >= n:
                    break
                fetch = min(n, fetch * 4)
            out.append(hits)
        return out

    def _eligible(self, id: int, class_name: str | None) -> bool:
        row = self._state.row_of.get(int(id))
        return row is not None and (class_name is None or self._state.records[row].class_name == class_name)

    def search_id(self, id: int, k: int, *, class_name: str | None = None) -> list[ArchiveHit]:
        """The ``k`` images most similar to the indexed image ``id`` (itself left out)."""
        return self.search_vectors(self.vector(id)[None], k, class_name=class_name, exclude=[int(id)])[0]

    # ------------------------------------------------------------------ updating
    @contextlib.contextmanager
    def _updating(self) -> Iterator[_State]:
        """Hold the writer locks, start from the newest generation on disk, and collect garbage after."""
        with self._write_lock, _file_lock(self.directory):
            name = _read_current(self.directory)
            if name is None:
                raise ArchiveError(f"archive {self.directory} lost its {CURRENT} file; rebuild it")
            if int(name[len(GEN_PREFIX):]) != self._state.generation:
                self._state = _load_state(self.directory, name)  # writers hold the lock: no clean-up runs
            yield self._state
            _collect_garbage(self.directory, self._state)

    def _publish(self, old: _State, index: Any, vectors: np.ndarray, records: list[ImageRecord], next_id: int) -> None:
        meta = {**old.meta, "updated": _now()}
        new = _State(old.generation + 1, index, vectors, records, next_id, meta)
        _write_generation(self.directory, new, old.generation)
        new.vectors = np.load(self.directory / _gen_name(new.generation) / "vectors.npy", mmap_mode="r")
        self._state = new

    def add(self, paths: Sequence[str | os.PathLike[str]], classes: Sequence[str | None] | None = None,
            *, batch_size: int = 32, progress: bool = False, max_pixels: int | None = None) -> list[ImageRecord]:
        """Index image files; returns the new records (duplicates of indexed files are skipped).

        Every file is decoded before anything is written: one unreadable file refuses the
        whole update (:class:`~landlens.errors.ImageReadError` naming it) and leaves the
        archive as it was. ``classes`` gives each file's class (``None``: unlabelled), each checked
        by :func:`validate_class_name`. ``max_pixels`` is the decode limit of :func:`load_query`.
        """
        files = [Path(p) for p in paths]
        if classes is not None and len(classes) != len(files):
            raise ArchiveError(f"{len(classes)} classes for {len(files)} images")
        labels = [validate_class_name(c) for c in classes] if classes is not None else [None] * len(files)
        for f in files:
            if not f.is_file():
                raise ImageReadError(f, file_problem(f) or "no such file")
        described = [_describe_file(f) for f in files]
        with self._updating() as state:
            return self._add_locked(state, files, labels, described, batch_size, progress, max_pixels)

    def _add_locked(self, state: _State, files: list[Path], labels: list[str | None],
                    described: list[tuple[int, int, str, int]], batch_size: int, progress: bool,
                    max_pixels: int | None) -> list[ImageRecord]:
        seen = dict(state.id_of_sha)
        todo = []
        for f, c, (w, h, s, n) in zip(files, labels, described):
            if s in seen:
                continue
            seen[s] = -1
            todo.append((f, c, w, h, s, n))
        if not todo:
            return []
        feats = []
        it = range(0, len(todo), batch_size)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="embedding", unit="batch")
        for s0 in it:
            imgs = [self.load_query(t[0], max_pixels=max_pixels) for t in todo[s0:s0 + batch_size]]
            feats.append(self.embed(imgs))
        x = np.concatenate(feats)
        index = copy.copy(state.index)
        from landlens.retrieval.index import _faiss

        index.index_ = _faiss().clone_index(state.index.index_)
        index.add(x)
        added = _now()
        new = [ImageRecord(state.next_id + i, str(f.resolve()), f.name, c, w, h, s, n, added)
               for i, (f, c, w, h, s, n) in enumerate(todo)]
        vectors = np.concatenate([np.asarray(state.vectors, dtype=np.float32), x])
        self._publish(state, index, vectors, [*state.records, *new], state.next_id + len(new))
        return new

    def add_upload(self, path: str | os.PathLike[str], class_name: str | None = None, *,
                   max_pixels: int | None = None) -> ImageRecord | None:
        """Keep a copy of the image file ``path`` in the archive (``uploads/<sha256><ext>``) and
        index it; ``None`` when an image with the same content is already indexed.

        The copy is made under the writers' lock, so the clean-up of an update running in
        another process never deletes it, and a crash before the commit leaves a file that the
        next clean-up deletes.
        """
        from landlens.data.io import probe_image

        src = Path(path)
        labels = [validate_class_name(class_name)]
        if not src.is_file():
            raise ImageReadError(src, file_problem(src) or "no such file")
        info = probe_image(src)
        suffix = UPLOAD_SUFFIXES.get(info.format)
        if suffix is None:
            raise ArchiveError(f"{src}: {info.format} images cannot be stored in an archive")
        sha, size = _sha256(src)
        with self._updating() as state:
            if sha in state.id_of_sha:
                return None
            dest = self.upload_path(sha, suffix)
            if not dest.is_file():
                part = dest.with_name(f".{dest.name}.part")
                shutil.copyfile(src, part)
                os.replace(part, dest)
            added = self._add_locked(state, [dest], labels, [(info.width, info.height, sha, size)], 32, False,
                                     max_pixels)
            return added[0]

    def remove(self, ids: Sequence[int]) -> int:
        """Drop images by id (the index is rebuilt over the rest); returns how many were removed.

        Uploaded files (under ``uploads/``) of removed images are deleted by the clean-up
        that follows the update.
        """
        from landlens.retrieval.index import SearchIndex

        want = {int(i) for i in ids}
        if not want:
            return 0
        with self._updating() as state:
            unknown = sorted(i for i in want if i not in state.row_of)
            if unknown:
                raise ArchiveError(f"no image with id {unknown[0]} in the archive"
                                   + (f" (and {len(unknown) - 1} more unknown ids)" if len(unknown) > 1 else ""))
            keep = [i for i, r in enumerate(state.records) if r.id not in want]
            if not keep:
                raise ArchiveError("cannot remove every image: an archive needs at least one; "
                                   "delete the folder instead")
            vectors = np.asarray(state.vectors, dtype=np.float32)[keep]
            old = state.index
            index = SearchIndex(**old.get_params(), meta=old.meta)
            index.fit(vectors)
            gone = [r for r in state.records if r.id in want]
            self._publish(state, index, vectors, [state.records[i] for i in keep], state.next_id)
        return len(gone)  # the clean-up after the update deleted their uploaded files

    def upload_path(self, sha256: str, suffix: str) -> Path:
        """Where an uploaded image with this content hash is kept (``uploads/<sha256><suffix>``)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArchiveError(f"not a sha256 digest: {sha256[:80]!r}")
        if suffix not in UPLOAD_SUFFIXES.values():
            raise ArchiveError(f"unsupported upload suffix {suffix!r}")
        d = self.directory / UPLOADS
        d.mkdir(exist_ok=True)
        return (d / f"{sha256}{suffix}").resolve()

    def id_of_sha256(self, sha256: str) -> int | None:
        """The id of the indexed image with this content hash, if any."""
        return self._state.id_of_sha.get(sha256)

    def __repr__(self) -> str:
        return (f"Archive({str(self.directory)!r}, generation={self.generation}, images={len(self)}, "
                f"backbone={self.backbone_name!r}, index={self.factory!r})")


__all__ = ["Archive", "ArchiveError", "ArchiveHit", "ImageRecord", "is_archive"]
