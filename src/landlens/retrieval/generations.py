"""The on-disk generations of an archive: layout, catalog, atomic commit, locks and clean-up.

:class:`~landlens.retrieval.archive.Archive` is the object users hold; this module is what it
stands on::

    ARCHIVE/
      CURRENT              name of the live generation (replaced atomically)
      gen-00000003/        the live generation, never modified once written:
        index/             the FAISS index (:class:`~landlens.retrieval.index.SearchIndex` folder);
                           its meta records the extractor (backbone, weights digest, preprocessing)
        vectors.npy        (n, dim) float32 features, row i = FAISS row i
        catalog.sqlite     one row per image: id, row, path, class, width, height, sha256, bytes, added;
                           for each chip of a scene, a row of ``geo``: scene, pixel window, gsd,
                           CRS, the window's transform, footprint in the scene CRS and in WGS84
        generation.json    generation number, image count, next id, parent generation
        text/              (optional) the image-text alignment and the vectors projected by it
                           (:class:`~landlens.retrieval.textspace.TextIndex`): search by words
      features/            (archives built before 0.2: their feature store; now in the shared cache)
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
import datetime as _dt
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from landlens.errors import LandlensError, first_line
from landlens.atomic import atomic_write_bytes

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
CREATE TABLE geo (
    id INTEGER PRIMARY KEY REFERENCES images(id),
    scene TEXT NOT NULL,
    col_off INTEGER NOT NULL,
    row_off INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    gsd REAL,
    crs TEXT NOT NULL,
    transform TEXT NOT NULL,
    footprint TEXT NOT NULL,
    footprint_wgs84 TEXT NOT NULL,
    west REAL NOT NULL,
    south REAL NOT NULL,
    east REAL NOT NULL,
    north REAL NOT NULL
);
CREATE INDEX geo_scene ON geo(scene);
"""


UPLOAD_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}
"""File suffix of an uploaded image kept in ``uploads/``, by format."""

CLASS_NAME_LIMIT = 200
"""Longest class name an archive accepts (characters)."""


class ArchiveError(LandlensError):
    """A user error about an archive: a missing or damaged folder, an unknown id, a bad update."""


class UnknownImageError(ArchiveError):
    """An image id that is not in the archive (the service answers 404)."""


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


def image_name(path: str) -> str:
    """How an image is named in listings: its file name, or ``scene.tif#window=COL,ROW,W,H``
    for a chip of a scene."""
    from landlens.scenes.refs import parse_chip_ref

    try:
        ref = parse_chip_ref(path)
    except LandlensError:
        ref = None
    return ref.short if ref is not None else Path(path).name


def stored_path(path: str | os.PathLike[str]) -> str:
    """The path an archive records for an image: the absolute file, or for a chip of a scene its
    canonical reference (absolute scene path, every setting written out, so it decodes the same
    wherever and whenever it is read)."""
    from landlens.scenes.refs import parse_chip_ref

    ref = parse_chip_ref(path)
    if ref is None:
        return str(Path(path).resolve())
    from landlens.scenes.reader import resolve

    return str(resolve(replace(ref, scene=str(Path(ref.scene).resolve()))))


@dataclass(frozen=True)
class GeoRecord:
    """Where a chip of a scene lies (the ``geo`` table of the catalog; JSON in :meth:`to_dict`).

    ``window`` is ``(col, row, width, height)`` on the scene's chip grid (its own pixels, or the
    grid at ``gsd`` metres); ``transform`` maps the chip's pixel corners to the scene CRS
    (``x = a*col + b*row + c``, ``y = d*col + e*row + f``); ``footprint`` and ``footprint_wgs84``
    are closed counter-clockwise rings through the window's four corners (WGS84 in longitude,
    latitude order); ``bounds`` is ``(west, south, east, north)`` of the WGS84 ring.
    """

    scene: str
    window: tuple[int, int, int, int]
    gsd: float | None
    crs: str
    transform: tuple[float, ...]
    footprint: tuple[tuple[float, float], ...]
    footprint_wgs84: tuple[tuple[float, float], ...]
    bounds: tuple[float, float, float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GeoRecord":
        return cls(str(d["scene"]), tuple(int(v) for v in d["window"]),  # type: ignore[arg-type]
                   None if d.get("gsd") is None else float(d["gsd"]), str(d["crs"]),
                   tuple(float(v) for v in d["transform"]),
                   tuple((float(x), float(y)) for x, y in d["footprint"]),
                   tuple((float(x), float(y)) for x, y in d["footprint_wgs84"]),
                   tuple(float(v) for v in d["bounds"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"scene": self.scene, "window": list(self.window), "gsd": self.gsd, "crs": self.crs,
                "transform": list(self.transform), "footprint": [list(p) for p in self.footprint],
                "footprint_wgs84": [list(p) for p in self.footprint_wgs84], "bounds": list(self.bounds)}


def chip_geo(paths: list[str]) -> list[GeoRecord | None]:
    """Per image path, its :class:`GeoRecord` when it is a chip reference, else ``None``
    (each scene opened once)."""
    from landlens.scenes.refs import parse_chip_ref

    refs = [parse_chip_ref(p) for p in paths]
    chips = [(i, r) for i, r in enumerate(refs) if r is not None]
    out: list[GeoRecord | None] = [None] * len(paths)
    if chips:
        from landlens.scenes.reader import chip_geo as scene_chip_geo

        for (i, _), d in zip(chips, scene_chip_geo([r for _, r in chips])):
            out[i] = GeoRecord.from_dict(d)
    return out


@dataclass
class Generation:
    """One loaded generation (immutable once published; updates build a new one)."""

    generation: int
    index: Any  # SearchIndex
    vectors: np.ndarray
    records: list[ImageRecord]  # in row order
    next_id: int
    meta: dict[str, Any]
    text: Any = None  # TextIndex (search by words), or None
    geo: dict[int, GeoRecord] = field(default_factory=dict)  # image id -> where a chip of a scene lies

    def __post_init__(self) -> None:
        self.row_of = {r.id: i for i, r in enumerate(self.records)}
        self.id_of_sha = {}
        for r in self.records:
            self.id_of_sha.setdefault(r.sha256, r.id)
        self.classes = np.array([r.class_name or "" for r in self.records], dtype=object)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: Path) -> tuple[str, int]:
    """``(sha256, bytes)`` of a file's content; for a chip of a scene, the chip's digest and
    sample bytes (:func:`landlens.scenes.reader.chip_digest`)."""
    from landlens.scenes.refs import parse_chip_ref

    ref = parse_chip_ref(path)
    if ref is not None:
        from landlens.scenes.reader import chip_digest

        return chip_digest(ref)
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def describe_file(path: Path) -> tuple[int, int, str, int]:
    """(width, height, sha256, bytes) of an image file (header only: no decoding)."""
    from landlens.data.io import probe_image

    info = probe_image(path)
    sha, size = sha256_file(path)
    return info.width, info.height, sha, size


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(p)
    fsync_dir(path)


@contextlib.contextmanager
def file_lock(directory: Path, name: str = LOCK, shared: bool = False) -> Iterator[None]:
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


def load_current(directory: Path) -> Generation | None:
    """The live generation, loaded under the shared readers' lock (``None``: no ``CURRENT``)."""
    with file_lock(directory, READERS, shared=True):
        name = read_current(directory)
        return None if name is None else load_generation(directory, name)


def generation_name(n: int) -> str:
    return f"{GEN_PREFIX}{n:08d}"


def read_current(directory: Path) -> str | None:
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


def load_generation(directory: Path, name: str) -> Generation:
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
            geo_rows = []
            if con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='geo'").fetchone():
                geo_rows = con.execute(_GEO_SELECT).fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ArchiveError(f"archive {directory}: cannot read {name}/catalog.sqlite: {first_line(exc)}") from None
    records = [ImageRecord(int(i), p, image_name(p), c, int(w), int(h), s, int(b), a)
               for i, _r, p, c, w, h, s, b, a in rows]
    if not (len(records) == vectors.shape[0] == index.ntotal == int(doc.get("images", -1))):
        raise ArchiveError(f"archive {directory}: generation {name} is inconsistent ({len(records)} catalog rows, "
                           f"{vectors.shape[0]} vectors, {index.ntotal} indexed); rebuild it")
    if [int(row[1]) for row in rows] != list(range(len(rows))):
        raise ArchiveError(f"archive {directory}: generation {name} has gaps in its catalog rows; rebuild it")
    try:
        geo = {int(g[0]): _geo_record(g) for g in geo_rows}
    except (TypeError, ValueError) as exc:
        raise ArchiveError(f"archive {directory}: generation {name} has a damaged geo table: {first_line(exc)}") from None
    if not geo.keys() <= {r.id for r in records}:
        raise ArchiveError(f"archive {directory}: generation {name} locates images it does not hold; rebuild it")
    return Generation(int(doc["generation"]), index, vectors, records, int(doc["next_id"]), dict(doc.get("meta") or {}),
                      _load_text(directory, gen, len(records)), geo)


_GEO_SELECT = ("SELECT id, scene, col_off, row_off, width, height, gsd, crs, transform, footprint, footprint_wgs84, "
               "west, south, east, north FROM geo")


def _geo_record(row: tuple[Any, ...]) -> GeoRecord:
    _, scene, c, r, w, h, gsd, crs, transform, fp, fpw, west, south, east, north = row
    return GeoRecord.from_dict({"scene": scene, "window": (c, r, w, h), "gsd": gsd, "crs": crs,
                                "transform": json.loads(transform), "footprint": json.loads(fp),
                                "footprint_wgs84": json.loads(fpw), "bounds": (west, south, east, north)})


def _geo_row(id: int, g: GeoRecord) -> tuple[Any, ...]:
    return (id, g.scene, *g.window, g.gsd, g.crs, json.dumps(list(g.transform)),
            json.dumps([list(p) for p in g.footprint]), json.dumps([list(p) for p in g.footprint_wgs84]), *g.bounds)


def _load_text(directory: Path, gen: Path, n: int) -> Any:
    from landlens.retrieval.textspace import TEXT_DIR, TextIndex

    if not (gen / TEXT_DIR).is_dir():
        return None
    try:
        text = TextIndex.load(gen / TEXT_DIR)
    except (LandlensError, OSError, ValueError) as exc:
        raise ArchiveError(f"archive {directory}: cannot read {gen.name}/{TEXT_DIR}: {first_line(exc)}") from None
    if text.vectors.shape[0] != n:
        raise ArchiveError(f"archive {directory}: generation {gen.name} has {text.vectors.shape[0]} text vectors "
                           f"for {n} images; rebuild it")
    return text


def write_generation(directory: Path, state: Generation, parent: int | None) -> None:
    """Write ``state`` as generation ``state.generation`` and make it current (atomic)."""
    name = generation_name(state.generation)
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
            con.executemany("INSERT INTO geo VALUES (" + ", ".join("?" * 15) + ")",
                            [_geo_row(r.id, state.geo[r.id]) for r in state.records if r.id in state.geo])
            con.commit()
        finally:
            con.close()
        doc = {"format": FORMAT_VERSION, "generation": state.generation, "parent": parent,
               "images": len(state.records), "next_id": state.next_id, "written": utc_now(), "meta": state.meta}
        if state.text is not None:
            from landlens.retrieval.textspace import TEXT_DIR

            state.text.save(tmp / TEXT_DIR)
        (tmp / "generation.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        fsync_tree(tmp)
        final = directory / name
        if final.exists():  # a partial generation of a crashed update that got this far
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_generation(directory, name)


def commit_generation(directory: Path, name: str) -> None:
    """Make the complete generation folder ``name`` the live one: replace ``CURRENT`` atomically."""
    atomic_write_bytes(directory / CURRENT, (name + "\n").encode())
    fsync_dir(directory)


def collect_garbage(directory: Path, state: Generation) -> None:
    """Delete every generation and temporary folder but the live one, and uploaded files no
    live image references (writers call it holding the writer's lock)."""
    keep = generation_name(state.generation)
    with file_lock(directory, READERS):  # waits for readers loading an older generation
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


__all__ = [
    "CLASS_NAME_LIMIT", "CURRENT", "FEATURES", "FORMAT_VERSION", "GEN_PREFIX", "LOCK", "READERS", "UPLOADS",
    "UPLOAD_SUFFIXES", "ArchiveError", "GeoRecord", "Generation", "chip_geo", "image_name", "stored_path", "UnknownImageError", "ImageRecord", "collect_garbage", "commit_generation",
    "describe_file", "file_lock", "fsync_dir", "fsync_tree", "generation_name", "is_archive", "load_current",
    "load_generation", "read_current", "sha256_file", "utc_now", "validate_class_name", "write_generation",
]  # fmt: skip
