"""Segments: the immutable pieces an archive generation is made of, and how several of them
are searched as one.

A segment is a folder written once (:func:`write_segment`) and never modified::

    segments/seg-00000007/
      index/             FAISS index over the segment's vectors (SearchIndex folder; its meta
                         records the extractor)
      vectors.npy        (n, dim) float32 features, local row i = index row i
      catalog.sqlite     one row per image (id, local row, path, class, size, sha256, ...) and,
                         for each chip of a scene, a row of ``geo``
      text/vectors.npy   (when the generation answers text queries) the vectors projected by
                         its alignment
      segment.json       image count, the generation that wrote it, when

A generation folder of landlens 0.2-0.3 (format 1: one folder per generation) holds the same
files and is read as one segment.

A generation lists its live segments, oldest first, and a deletion set: ids removed since their
segment was written. Its live rows are the segments' rows in order with the deleted ones left
out; :class:`RowStack` shows them as one array and :class:`SegmentIndex` searches them as one
index, merging each segment's top-k (over-fetched by that segment's deleted count, so a
deleted row never costs a result). :func:`plan_merges` is the compaction policy that keeps the
number of segments and the deleted share small.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from landlens.atomic import atomic_folder, atomic_write_json
from landlens.errors import first_line
from landlens.retrieval.records import ArchiveError, GeoRecord, ImageRecord, image_name, utc_now

SEGMENTS = "segments"
SEG_PREFIX = "seg-"
SEGMENT_JSON = "segment.json"
TEXT_VECTORS = "text/vectors.npy"

MERGE_FANOUT = 10
"""Segments of about the same size (the same power of this number of live images) that are
merged into one when there are this many: each image is rewritten about ``log10(N)`` times over
the archive's life, and an archive holds at most ``9 * log10(N)`` segments."""

MAX_DELETED_SHARE = 0.25
"""A segment with more than this share of its images deleted is rewritten without them."""

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


@dataclass(eq=False)
class Segment:
    """One loaded segment. ``path`` is its folder relative to the archive (``segments/seg-...``,
    or ``gen-...`` for a format-1 generation); ``text`` its vectors in the text space, if any."""

    path: str
    index: Any  # SearchIndex
    vectors: np.ndarray  # (n, dim) float32, memory-mapped
    records: list[ImageRecord]  # in local row order
    geo: dict[int, GeoRecord]
    text: np.ndarray | None = None
    ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = np.fromiter((r.id for r in self.records), dtype=np.int64, count=len(self.records))
        self.index.use_vectors(self.vectors)  # an on-disk index re-ranks its shortlist with them

    def __len__(self) -> int:
        return len(self.records)


def segment_name(generation: int) -> str:
    """The folder (relative to the archive) of the segment written by update ``generation``."""
    return f"{SEGMENTS}/{SEG_PREFIX}{generation:08d}"


def write_segment(directory: Path, rel: str, index: Any, vectors: np.ndarray, records: Sequence[ImageRecord],
                  geo: dict[int, GeoRecord], text: np.ndarray | None = None, meta: dict[str, Any] | None = None
                  ) -> Segment:
    """Write a segment folder ``directory/rel`` atomically (flushed to disk before it appears) and
    return it loaded (vectors memory-mapped). ``records`` are in ``vectors`` row order; ``meta``
    goes into the catalog's ``meta`` table."""
    records = list(records)
    if not (len(records) == len(vectors) == index.ntotal):
        raise ArchiveError(f"segment {rel}: {len(records)} records, {len(vectors)} vectors, {index.ntotal} indexed")
    with atomic_folder(directory / rel) as tmp:
        index.save(tmp / "index")
        with open(tmp / "vectors.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
        con = sqlite3.connect(tmp / "catalog.sqlite")
        try:
            con.executescript(_SCHEMA)
            con.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(r.id, i, r.path, r.class_name, r.width, r.height, r.sha256, r.bytes, r.added)
                             for i, r in enumerate(records)])
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v, sort_keys=True)) for k, v in (meta or {}).items()])
            con.executemany("INSERT INTO geo VALUES (" + ", ".join("?" * 15) + ")",
                            [_geo_row(r.id, geo[r.id]) for r in records if r.id in geo])
            con.commit()
        finally:
            con.close()
        if text is not None:
            (tmp / "text").mkdir()
            with open(tmp / TEXT_VECTORS, "wb") as f:
                np.save(f, np.ascontiguousarray(text, dtype=np.float32))
        atomic_write_json(tmp / SEGMENT_JSON, {"images": len(records), "written": utc_now()})
    seg_dir = directory / rel
    return Segment(rel, index, np.load(seg_dir / "vectors.npy", mmap_mode="r"), records,
                   {r.id: geo[r.id] for r in records if r.id in geo},
                   None if text is None else np.load(seg_dir / TEXT_VECTORS, mmap_mode="r"))


def load_segment(directory: Path, rel: str, images: int | None = None) -> Segment:
    """Read the segment folder ``directory/rel`` (checked: catalog, vectors and index agree, and
    hold ``images`` rows when given)."""
    from landlens.retrieval.index import SearchIndex, SearchIndexError

    seg = directory / rel
    where = f"archive {directory}: {rel}"
    try:
        index = SearchIndex.load(seg / "index")
    except SearchIndexError as exc:
        raise ArchiveError(f"archive {directory}: {exc}") from None
    try:
        vectors = np.load(seg / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{where}/vectors.npy is unreadable: {first_line(exc)}") from None
    try:
        con = sqlite3.connect(f"file:{seg / 'catalog.sqlite'}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT id, row, path, class, width, height, sha256, bytes, added "
                               "FROM images ORDER BY row").fetchall()
            geo_rows = []
            if con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='geo'").fetchone():
                geo_rows = con.execute(_GEO_SELECT).fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ArchiveError(f"{where}/catalog.sqlite is unreadable: {first_line(exc)}") from None
    records = [ImageRecord(int(i), p, image_name(p), c, int(w), int(h), s, int(b), a)
               for i, _r, p, c, w, h, s, b, a in rows]
    if not (len(records) == vectors.shape[0] == index.ntotal) or (images is not None and len(records) != images):
        raise ArchiveError(f"{where} is inconsistent ({len(records)} catalog rows, {vectors.shape[0]} vectors, "
                           f"{index.ntotal} indexed" + (f", {images} listed" if images is not None else "")
                           + "); rebuild the archive")
    if [int(row[1]) for row in rows] != list(range(len(rows))):
        raise ArchiveError(f"{where} has gaps in its catalog rows; rebuild the archive")
    try:
        geo = {int(g[0]): _geo_record(g) for g in geo_rows}
    except (TypeError, ValueError) as exc:
        raise ArchiveError(f"{where} has a damaged geo table: {first_line(exc)}") from None
    if not geo.keys() <= {r.id for r in records}:
        raise ArchiveError(f"{where} locates images it does not hold; rebuild the archive")
    text = None
    if (seg / TEXT_VECTORS).is_file():
        try:
            text = np.load(seg / TEXT_VECTORS, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"{where}/{TEXT_VECTORS} is unreadable: {first_line(exc)}") from None
        if text.shape[0] != len(records):
            raise ArchiveError(f"{where} has {text.shape[0]} text vectors for {len(records)} images; rebuild it")
    return Segment(rel, index, vectors, records, geo, text)


def live_rows(segment: Segment, deleted: frozenset[int]) -> np.ndarray | None:
    """The segment's local rows whose images are not in ``deleted`` (``None``: all of them)."""
    if not deleted:
        return None
    gone = np.isin(segment.ids, np.fromiter(deleted, dtype=np.int64, count=len(deleted)))
    return np.flatnonzero(~gone) if gone.any() else None


def live_records(segment: Segment, live: np.ndarray | None) -> list[ImageRecord]:
    """The segment's records at the local rows ``live`` (all of them for ``None``), in row order."""
    return segment.records if live is None else [segment.records[i] for i in live]


class RowStack:
    """The live rows of several (n_i, d) arrays as one read-only (n, d) array: indexing by a row or
    an array of rows gathers from the parts; :func:`numpy.asarray` concatenates once (cached)."""

    def __init__(self, parts: Sequence[np.ndarray], live: Sequence[np.ndarray | None]) -> None:
        self.parts = list(parts)
        self.live = list(live)
        counts = [len(p) if lv is None else len(lv) for p, lv in zip(self.parts, self.live)]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self._whole: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _local(self, part: int, rows: np.ndarray) -> np.ndarray:
        lv = self.live[part]
        return rows - self.starts[part] if lv is None else lv[rows - self.starts[part]]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if self._whole is not None:
            return self._whole[rows]
        if isinstance(rows, (int, np.integer)):
            r = int(rows) + (self.shape[0] if int(rows) < 0 else 0)
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"row {rows} out of range for {self.shape[0]} rows")
            part = int(np.searchsorted(self.starts, r, side="right")) - 1
            return np.asarray(self.parts[part][int(self._local(part, np.int64(r)))], dtype=np.float32)
        idx = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"rows out of range for {self.shape[0]} rows")
        out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        part_of = np.searchsorted(self.starts, idx, side="right") - 1
        for part in np.unique(part_of):
            at = np.flatnonzero(part_of == part)
            local = self._local(int(part), idx[at])
            order = np.argsort(local, kind="stable")  # ascending reads of a memory map
            out[at[order]] = self.parts[int(part)][local[order]]
        return out.reshape(*np.shape(idx), self.shape[1])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self._whole is None:
            self._whole = np.concatenate([np.asarray(p if lv is None else p[lv], dtype=np.float32)
                                          for p, lv in zip(self.parts, self.live)])
        return self._whole if dtype is None else self._whole.astype(dtype, copy=False)


class SegmentIndex:
    """Several segments' indexes searched as one over the generation's live rows (read-only; the
    search settings ``nprobe`` and ``ef_search`` apply to every segment)."""

    def __init__(self, segments: Sequence[Segment], live: Sequence[np.ndarray | None], starts: np.ndarray) -> None:
        self.segments = list(segments)
        self.starts = starts
        self.extra = [0 if lv is None else len(s) - len(lv) for s, lv in zip(self.segments, live)]
        self.global_of = []  # per segment: local row -> live row, -1 for a deleted one
        for s, lv, start in zip(self.segments, live, starts):
            if lv is None:
                self.global_of.append(None)
            else:
                g = np.full(len(s), -1, dtype=np.int64)
                g[lv] = start + np.arange(len(lv))
                self.global_of.append(g)
        self.main = max(self.segments, key=len).index  # what describes the whole: the largest

    # what callers read of an index
    metric = property(lambda self: self.main.metric)
    dim_ = property(lambda self: self.main.dim_)
    meta = property(lambda self: self.main.meta)
    factory_ = property(lambda self: self.main.factory_)
    kind_ = property(lambda self: self.main.kind_)
    build_seconds_ = property(lambda self: float("nan"))

    @property
    def ntotal(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.ntotal

    def _setting(name: str) -> property:  # noqa: N805 - a property factory used in the class body
        def get(self: "SegmentIndex") -> Any:
            return getattr(self.main, name)

        def put(self: "SegmentIndex", value: Any) -> None:
            for s in self.segments:
                setattr(s.index, name, value)

        return property(get, put)

    nprobe = _setting("nprobe")
    ef_search = _setting("ef_search")
    del _setting

    def index_bytes(self) -> int:
        return sum(s.index.index_bytes() for s in self.segments)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, rows)`` (nq, k) over the live rows, nearest first; each segment is asked
        for ``k`` plus its deleted count, so the deletion set never shortens a result. Ties keep
        segment order. Rows -1 / distance inf pad a result an approximate index left short."""
        from landlens.retrieval.index import SearchIndexError

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise SearchIndexError(f"k={k!r}: ask for 1 <= k <= {self.ntotal}")
        dists, rows = [], []
        for s, g, start, extra in zip(self.segments, self.global_of, self.starts, self.extra):
            ks = min(len(s), int(k) + extra)
            if ks == 0 or len(s) == extra:
                continue
            d, r = s.index.search(queries, ks)
            glob = np.where(r >= 0, r + start, -1) if g is None else np.where(r >= 0, g[np.maximum(r, 0)], -1)
            dists.append(np.where(glob >= 0, d, np.inf))
            rows.append(glob)
        d = np.concatenate(dists, axis=1)
        r = np.concatenate(rows, axis=1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        d, r = np.take_along_axis(d, order, 1), np.take_along_axis(r, order, 1)
        if d.shape[1] < k:
            pad = k - d.shape[1]
            d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
            r = np.pad(r, ((0, 0), (0, pad)), constant_values=-1)
        r[~np.isfinite(d)] = -1
        return d.astype(np.float32, copy=False), r.astype(np.int64, copy=False)

    def __repr__(self) -> str:
        return f"SegmentIndex({len(self.segments)} segments, ntotal={self.ntotal}, main={self.factory_!r})"


def _tier(n: int, fanout: int) -> int:
    """``floor(log_fanout(n))`` computed in integers (0 for ``n`` below ``fanout``)."""
    tier = 0
    while n >= fanout:
        n //= fanout
        tier += 1
    return tier


def plan_merges(sizes: Sequence[int], deleted: Sequence[int], fanout: int = MERGE_FANOUT,
                max_deleted: float = MAX_DELETED_SHARE) -> list[list[int]]:
    """Which segments (positions in ``sizes``, oldest first) to rewrite, as groups each merged into
    one segment: a segment with more than ``max_deleted`` of its ``sizes`` images ``deleted`` on its
    own, and ``fanout`` or more segments in one size tier (``floor(log_fanout(live images))``)
    together. Segments in no group stay as they are; an empty list means nothing to do."""
    groups: list[list[int]] = []
    taken: set[int] = set()
    for i, (n, d) in enumerate(zip(sizes, deleted)):
        if n and d / n > max_deleted:
            groups.append([i])
            taken.add(i)
    tiers: dict[int, list[int]] = {}
    for i, (n, d) in enumerate(zip(sizes, deleted)):
        if i not in taken:
            tiers.setdefault(_tier(n - d, fanout), []).append(i)
    groups.extend(members for _, members in sorted(tiers.items()) if len(members) >= fanout)
    return groups


def segment_index_settings(settings: dict[str, Any], n: int, full: bool) -> dict[str, Any]:
    """The :class:`~landlens.retrieval.index.SearchIndex` settings of a new segment of ``n`` images
    in an archive built with ``settings``: those settings for a full compaction (``full``, as the
    build did); otherwise exact search below ``AUTO_EXACT_MAX`` images (a batch of additions is
    searched exactly and needs no training), and from there the archive's kind when it is a named
    kind, which sizes itself (a FAISS factory string fixed for the whole archive becomes ``auto``)."""
    from landlens.retrieval.index import AUTO_EXACT_MAX, KINDS

    if full:
        return dict(settings)
    kind = settings.get("kind", "auto")
    kind = "exact" if n < AUTO_EXACT_MAX else kind if kind in KINDS else "auto"
    return {**settings, "kind": kind}


__all__ = ["MAX_DELETED_SHARE", "MERGE_FANOUT", "SEGMENTS", "SEG_PREFIX", "RowStack", "Segment", "SegmentIndex",
           "live_records", "live_rows", "load_segment", "plan_merges", "segment_index_settings", "segment_name", "write_segment"]
