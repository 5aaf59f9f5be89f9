"""The on-disk generations of an archive: layout, atomic commit, locks and clean-up.

:class:`~landlens.retrieval.archive.Archive` is the object users hold; this module is what it
stands on::

    ARCHIVE/
      CURRENT              name of the live generation (replaced atomically)
      gen-00000009/        the live generation, never modified once written:
        generation.json    generation number, live image count, next id, parent, meta, the
                           live segments (oldest first) and the alignment file, if any
        deleted.npy        the deletion set: ids removed from the listed segments (when any)
      segments/            immutable pieces of the archive (:mod:`landlens.retrieval.segments`):
        seg-00000001/      index/, vectors.npy, catalog.sqlite (and text/vectors.npy)
        seg-00000008/      ... one per update that added images or merged segments
        align-00000005.safetensors   an image-text alignment attached by generation 5
      uploads/             images added through the service, named by their sha256
      rerank/              fitted re-rankers of the live generation (``gen-00000009.<spec hash>
                           .safetensors``), written by the first search that fits one so that
                           later processes restore it; a cache: deleted with its generation
      .lock                serialises writers across processes (``fcntl.flock``)
      .readers             readers hold it shared while loading a generation; the writer's
                           clean-up holds it exclusive, so a load never sees its files vanish

An update writes only what it changes: adding images writes one new segment (their vectors,
catalog rows and a small index) and a new generation file listing it beside the others;
removing images writes a new generation file with a larger deletion set. Both cost time and
bytes in proportion to the batch, not the archive. Searches merge each segment's top-k
(:class:`~landlens.retrieval.segments.SegmentIndex`). After an update the compaction policy
(:func:`~landlens.retrieval.segments.plan_merges`) merges segments of about the same size once
there are ten and rewrites a segment that has lost a quarter of its images;
:meth:`Archive.compact <landlens.retrieval.archive.Archive.compact>` merges everything into one.

Every piece is written into a temporary folder, flushed to disk and renamed into place before
the generation that lists it; ``CURRENT`` is replaced with a rename last. A crash at any point
leaves ``CURRENT`` naming a complete generation: the previous one until the rename, the new one
after it. Left-over partial generations and segments no live generation lists are ignored on
open and deleted by the next update, as are uploaded files that no live image references.
Readers load under a shared lock (``.readers``) that the clean-up takes exclusively, so a
reader that read ``CURRENT`` just before a writer committed still loads the generation it
named; once loaded, a generation needs none of its files but the segments' memory-mapped
vectors, which stay readable after deletion.

Format 1 archives (landlens 0.2-0.3: each generation one folder holding everything) are read
as a generation of one segment, that folder; their next update writes format 2 around it.

Image ids are stable integers that are never reused. Rows (positions in
:attr:`Generation.records` and :attr:`Generation.vectors`) are the live images in segment
order and change when images are removed or segments merged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landlens.atomic import atomic_folder, atomic_write_bytes, fsync_dir, fsync_tree
from landlens.errors import LandlensError, first_line
from landlens.retrieval.records import (
    CLASS_NAME_LIMIT, UPLOAD_SUFFIXES, ArchiveError, GeoRecord, ImageRecord, UnknownImageError, chip_geo,
    describe_file, image_name, sha256_file, stored_path, utc_now, validate_class_name,
)
from landlens.retrieval.segments import (
    SEGMENTS, RowStack, Segment, SegmentIndex, live_records, live_rows, load_segment,
)

FORMAT_VERSION = 2
LEGACY_FORMAT = 1
CURRENT = "CURRENT"
GEN_PREFIX = "gen-"
LOCK = ".lock"
UPLOADS = "uploads"
RERANK = "rerank"
FEATURES = "features"
READERS = ".readers"
GENERATION_JSON = "generation.json"
DELETED = "deleted.npy"
LEGACY_ALIGNMENT = "text/alignment.safetensors"


@dataclass(eq=False)
class Generation:
    """One loaded generation (immutable once published; updates build a new one): its segments,
    deletion set and alignment, and derived from them the live ``records`` (row order), ``vectors``
    (row-indexable, :class:`~landlens.retrieval.segments.RowStack` over several segments),
    ``index`` (searched over the live rows), ``text`` (the rows in the text space), ``geo``,
    ``row_of`` (id -> row), ``id_of_sha`` and ``classes`` (one per row).

    ``base``: the generation this one extends by segments appended with the same deletion set;
    its derived tables are copied rather than rebuilt (an update's cost stays that of the batch).
    """

    generation: int
    segments: list[Segment]
    deleted: frozenset[int]
    next_id: int
    meta: dict[str, Any]
    alignment: Any = None  # Alignment, when the archive answers text queries
    alignment_ref: str | None = None  # its file, relative to the archive folder
    base: InitVar["Generation | None"] = None
    live: list[np.ndarray | None] = field(init=False, repr=False)

    def __post_init__(self, base: "Generation | None") -> None:
        if not self.segments:
            raise ArchiveError("an archive generation needs at least one segment")
        n_base = len(base.segments) if base is not None else 0
        extends = (base is not None and base.deleted == self.deleted
                   and [s.path for s in base.segments] == [s.path for s in self.segments[:n_base]])
        if extends:
            assert base is not None
            self.live = [*base.live, *(live_rows(s, self.deleted) for s in self.segments[n_base:])]
            new = [r for s, lv in zip(self.segments[n_base:], self.live[n_base:]) for r in live_records(s, lv)]
            self.records = [*base.records, *new]
            self.row_of = dict(base.row_of)
            self.id_of_sha = dict(base.id_of_sha)
            self.geo = dict(base.geo)
            self.classes = np.concatenate([base.classes, np.array([r.class_name or "" for r in new], dtype=object)])
        else:
            self.live = [live_rows(s, self.deleted) for s in self.segments]
            new = [r for s, lv in zip(self.segments, self.live) for r in live_records(s, lv)]
            self.records, self.row_of, self.id_of_sha, self.geo = new, {}, {}, {}
            self.classes = np.array([r.class_name or "" for r in new], dtype=object)
        start = len(self.records) - len(new)
        self.row_of.update((r.id, start + i) for i, r in enumerate(new))
        for r in new:
            self.id_of_sha.setdefault(r.sha256, r.id)
        for s in self.segments[n_base if extends else 0:]:
            self.geo.update((i, g) for i, g in s.geo.items() if i not in self.deleted)
        if len(self.segments) == 1 and self.live[0] is None:
            self.vectors: Any = self.segments[0].vectors
            self.index: Any = self.segments[0].index
        else:
            self.vectors = RowStack([s.vectors for s in self.segments], self.live)
            self.index = SegmentIndex(self.segments, self.live, self.vectors.starts)
        self.text = None
        if self.alignment is not None:
            from landlens.retrieval.textspace import TextIndex

            missing = [s.path for s in self.segments if s.text is None]
            if missing:
                raise ArchiveError(f"archive generation {self.generation}: segment {missing[0]} has no text "
                                   f"vectors for its alignment; attach the alignment again")
            parts = [s.text for s in self.segments]
            one = len(parts) == 1 and self.live[0] is None
            self.text = TextIndex(self.alignment, parts[0] if one else RowStack(parts, self.live))  # type: ignore[arg-type]

    @property
    def index_settings(self) -> dict[str, Any]:
        """The index settings the archive was built with (what compaction rebuilds with)."""
        recorded = self.meta.get("index_settings")
        return dict(recorded) if recorded else self.segments[0].index.get_params()


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



def load_current(directory: Path, reuse: Generation | None = None) -> Generation | None:
    """The live generation, loaded under the shared readers' lock (``None``: no ``CURRENT``);
    segments already loaded in ``reuse`` are taken from it rather than read again."""
    with file_lock(directory, READERS, shared=True):
        name = read_current(directory)
        if name is None:
            return None
        return load_generation(directory, name) if reuse is None else load_generation(directory, name, reuse)


def generation_name(n: int) -> str:
    return f"{GEN_PREFIX}{n:08d}"


def rerank_state_path(directory: Path, generation: int, spec: str) -> Path:
    """Where the re-ranker ``spec`` fitted on generation ``generation`` is kept (``rerank/``)."""
    import hashlib

    digest = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
    return directory / RERANK / f"{generation_name(generation)}.{digest}.safetensors"


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



def _read_doc(directory: Path, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((directory / name / GENERATION_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"archive {directory}: generation {name} is unreadable: {first_line(exc)}") from None
    if doc.get("format") == LEGACY_FORMAT:  # one folder holding everything: one segment
        doc["segments"] = [{"path": name, "images": doc.get("images")}]
        doc["deleted"] = 0
        doc["alignment"] = f"{name}/{LEGACY_ALIGNMENT}" if (directory / name / LEGACY_ALIGNMENT).is_file() else None
    elif doc.get("format") != FORMAT_VERSION:
        raise ArchiveError(f"archive {directory} has format {doc.get('format')}, expected {FORMAT_VERSION} "
                           f"(or {LEGACY_FORMAT})")
    return doc


def _safe_ref(directory: Path, ref: Any) -> str:
    """A path a generation lists, checked to lie inside the archive folder."""
    if not isinstance(ref, str) or not ref or ref.startswith("/") or ".." in ref.split("/"):
        raise ArchiveError(f"archive {directory}: a generation lists {str(ref)[:60]!r}, not a path in the archive")
    return ref


def load_generation(directory: Path, name: str, reuse: Generation | None = None) -> Generation:
    """Read generation ``name`` (segments of ``reuse`` with the same path are not read again)."""
    doc = _read_doc(directory, name)
    known = {s.path: s for s in reuse.segments} if reuse is not None else {}
    segments = []
    for entry in doc.get("segments") or []:
        ref = _safe_ref(directory, entry.get("path"))
        segments.append(known.get(ref) or load_segment(directory, ref, entry.get("images")))
    if not segments:
        raise ArchiveError(f"archive {directory}: generation {name} lists no segment; rebuild it")
    deleted: frozenset[int] = frozenset()
    if int(doc.get("deleted") or 0):
        try:
            deleted = frozenset(int(i) for i in np.load(directory / name / DELETED))
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"archive {directory}: cannot read {name}/{DELETED}: {first_line(exc)}") from None
        if len(deleted) != int(doc["deleted"]):
            raise ArchiveError(f"archive {directory}: {name}/{DELETED} holds {len(deleted)} ids, "
                               f"generation.json says {doc['deleted']}; rebuild it")
    alignment, ref = None, doc.get("alignment")
    if ref is not None:
        ref = _safe_ref(directory, ref)
        if reuse is not None and reuse.alignment_ref == ref:
            alignment = reuse.alignment
        else:
            from landlens.retrieval.alignment import Alignment

            try:
                alignment = Alignment.load(directory / ref)
            except (LandlensError, OSError, ValueError) as exc:
                raise ArchiveError(f"archive {directory}: cannot read {ref}: {first_line(exc)}") from None
    state = Generation(int(doc["generation"]), segments, deleted, int(doc["next_id"]), dict(doc.get("meta") or {}),
                       alignment, ref)
    if len(state.records) != int(doc.get("images", -1)):
        raise ArchiveError(f"archive {directory}: generation {name} lists {doc.get('images')} images but its "
                           f"segments hold {len(state.records)} live ones; rebuild it")
    return state


def write_generation(directory: Path, state: Generation, parent: int | None) -> None:
    """Write ``state`` as generation ``state.generation`` and make it current (atomic). Its
    segments and alignment file must already be on disk."""
    name = generation_name(state.generation)
    with atomic_folder(directory / name) as tmp:
        if state.deleted:
            with open(tmp / DELETED, "wb") as f:
                np.save(f, np.array(sorted(state.deleted), dtype=np.int64))
        doc = {"format": FORMAT_VERSION, "generation": state.generation, "parent": parent,
               "images": len(state.records), "next_id": state.next_id, "written": utc_now(), "meta": state.meta,
               "segments": [{"path": s.path, "images": len(s)} for s in state.segments],
               "deleted": len(state.deleted), "alignment": state.alignment_ref}
        (tmp / GENERATION_JSON).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    commit_generation(directory, name)


def commit_generation(directory: Path, name: str) -> None:
    """Make the complete generation folder ``name`` the live one: replace ``CURRENT`` atomically."""
    atomic_write_bytes(directory / CURRENT, (name + "\n").encode())
    fsync_dir(directory)


def collect_garbage(directory: Path, state: Generation) -> None:
    """Delete every generation, segment, alignment and temporary folder the live generation does
    not use, and uploaded files no live image references (writers call it holding the writer's lock)."""
    refs = {s.path for s in state.segments} | ({state.alignment_ref} if state.alignment_ref else set())
    keep_top = {generation_name(state.generation)} | {r.split("/")[0] for r in refs if not r.startswith(SEGMENTS + "/")}
    keep_seg = {r.split("/")[1] for r in refs if r.startswith(SEGMENTS + "/")}
    with file_lock(directory, READERS):  # waits for readers loading an older generation
        for p in directory.iterdir():
            stale_gen = p.name.startswith(GEN_PREFIX) and p.name not in keep_top
            stale_tmp = p.name.startswith(f".{GEN_PREFIX}") and p.name.endswith(".tmp")
            if (stale_gen or stale_tmp) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        segments = directory / SEGMENTS
        if segments.is_dir():
            for p in segments.iterdir():
                if p.name not in keep_seg:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            p.unlink()
        fitted = directory / RERANK
        if fitted.is_dir():
            for p in fitted.iterdir():  # fitted on a generation that is gone (or a partial write)
                if not p.name.startswith(generation_name(state.generation) + "."):
                    with contextlib.suppress(OSError):
                        p.unlink()
        uploads = directory / UPLOADS
        if uploads.is_dir():
            for p in uploads.iterdir():  # named <sha256><suffix>, or .<name>.part while copied
                if p.name.startswith(".") or p.stem not in state.id_of_sha:
                    with contextlib.suppress(OSError):
                        p.unlink()


__all__ = [
    "CLASS_NAME_LIMIT", "CURRENT", "DELETED", "FEATURES", "FORMAT_VERSION", "GEN_PREFIX", "LEGACY_FORMAT", "LOCK",
    "READERS", "RERANK", "UPLOADS", "UPLOAD_SUFFIXES", "ArchiveError", "GeoRecord", "Generation", "ImageRecord",
    "UnknownImageError", "chip_geo", "collect_garbage", "commit_generation", "describe_file", "file_lock", "fsync_dir",
    "fsync_tree", "generation_name", "image_name", "is_archive", "load_current", "load_generation", "read_current",
    "rerank_state_path", "sha256_file", "stored_path", "utc_now", "validate_class_name", "write_generation",
]  # fmt: skip
