"""Updating an archive: adding images (files, chips of scenes, uploads), removing them,
compacting its segments, attaching an image-text alignment.

:class:`ArchiveUpdates` is the update half of :class:`~landlens.retrieval.archive.Archive`. Every
update holds the writers' locks (a thread lock and ``fcntl.flock`` across processes), starts from
the newest generation on disk, writes the segments it makes, then the generation that lists them
(:mod:`landlens.retrieval.generations`), and collects what no live generation uses. Adding writes
a segment of the batch, removing a deletion set; the compaction policy
(:func:`~landlens.retrieval.segments.plan_merges`) merges segments within the same update.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landlens.atomic import atomic_path
from landlens.data.io import file_problem
from landlens.errors import ImageReadError
from landlens.retrieval.generations import (
    CURRENT, GEN_PREFIX, UPLOAD_SUFFIXES, UPLOADS, ArchiveError, GeoRecord, Generation, ImageRecord, chip_geo,
    collect_garbage, describe_file, file_lock, image_name, load_generation, read_current, sha256_file, stored_path,
    utc_now, validate_class_name, write_generation,
)
from landlens.retrieval.segments import (
    SEGMENTS, RowStack, Segment, live_records, plan_merges, segment_index_settings, segment_name, write_segment,
)


class ArchiveUpdates:
    """Update methods of :class:`~landlens.retrieval.archive.Archive` (a mixin: the archive
    provides ``directory``, ``_state``, ``load_query`` and ``embed``)."""

    directory: Path
    _state: Generation
    _write_lock: threading.Lock

    # ------------------------------------------------------------------ updating
    @contextlib.contextmanager
    def _updating(self) -> Iterator[Generation]:
        """Hold the writer locks, start from the newest generation on disk, and collect garbage after."""
        with self._write_lock, file_lock(self.directory):
            name = read_current(self.directory)
            if name is None:
                raise ArchiveError(f"archive {self.directory} lost its {CURRENT} file; rebuild it")
            if int(name[len(GEN_PREFIX):]) != self._state.generation:  # writers hold the lock: no clean-up runs
                self._state = load_generation(self.directory, name, self._state)
            yield self._state
            collect_garbage(self.directory, self._state)

    def _commit(self, old: Generation, segments: list[Segment], *, deleted: frozenset[int] | None = None,
                next_id: int | None = None, alignment: tuple[Any, str | None] | None = None,
                appended: bool = False, compact: bool = True) -> None:
        """Publish the generation after ``old`` made of ``segments`` (written already), with
        ``old``'s deletion set, next id and alignment unless given, after the compaction policy's
        merges (``compact``; :func:`~landlens.retrieval.segments.plan_merges`), which it writes as
        segments of the same generation. ``appended``: ``segments`` are ``old``'s with new ones
        after them, so its derived tables are extended rather than rebuilt."""
        al, ref = alignment if alignment is not None else (old.alignment, old.alignment_ref)
        new = Generation(old.generation + 1, segments, old.deleted if deleted is None else deleted,
                         old.next_id if next_id is None else next_id, {**old.meta, "updated": utc_now()}, al, ref,
                         base=old if appended else None)
        merges = 0
        while compact:
            groups = plan_merges([len(s) for s in new.segments],
                                 [0 if lv is None else len(s) - len(lv) for s, lv in zip(new.segments, new.live)])
            if not groups:
                break
            merges += 1
            segs, gone = self._merged_segments(new, groups[0], f"{segment_name(new.generation)}.{merges}")
            new = Generation(new.generation, segs, gone, new.next_id, new.meta, al, ref)
        write_generation(self.directory, new, old.generation)
        self._state = new

    def _write_segment(self, state: Generation, name: str, vectors: np.ndarray, records: list[ImageRecord],
                       geo: dict[int, GeoRecord], *, full: bool, text: np.ndarray | None = None,
                       alignment: Any = None) -> Segment:
        """Index ``vectors`` (the settings of :func:`segment_index_settings`) and write them with
        their records as the segment ``name``; its text vectors are ``text`` or, under an
        ``alignment`` (default: the archive's), projected from ``vectors``."""
        from landlens.retrieval.index import SearchIndex

        index = SearchIndex(**segment_index_settings(state.index_settings, len(vectors), full), meta=state.index.meta)
        index.fit(vectors, scratch=self.directory / SEGMENTS)
        al = state.alignment if alignment is None else alignment
        if text is None and al is not None:
            text = al.images(vectors)
        return write_segment(self.directory, name, index, vectors, records, geo, text)

    def _merged_segments(self, state: Generation, members: Sequence[int], name: str, *, full: bool = False,
                         alignment: Any = None) -> tuple[list[Segment], frozenset[int]]:
        """``state``'s segments with those at positions ``members`` rewritten as one segment
        ``name`` (deleted images left out) in the place of the first, and the deletion set left;
        ``alignment``: project the text vectors with this one instead of keeping the segments'."""
        parts = [state.segments[i] for i in members]
        live = [state.live[i] for i in members]
        kept = [live_records(s, lv) for s, lv in zip(parts, live)]
        records = [r for rs in kept for r in rs]
        ids = {int(i) for s in parts for i in s.ids}
        segments = [s for i, s in enumerate(state.segments) if i not in set(members)]
        if records:
            vectors = np.asarray(RowStack([s.vectors for s in parts], live))
            text = None
            if alignment is None and state.alignment is not None:
                text = np.asarray(RowStack([s.text for s in parts], live))
            geo = {r.id: s.geo[r.id] for s, rs in zip(parts, kept) for r in rs if r.id in s.geo}
            seg = self._write_segment(state, name, vectors, records, geo, full=full, text=text, alignment=alignment)
            segments.insert(sum(1 for i in range(members[0]) if i not in members), seg)
        return segments, state.deleted - ids

    def compact(self) -> bool:
        """Merge every segment into one without the deleted images, its index rebuilt with the
        archive's settings (IVF kinds retrained): searches touch one index again. Costs time
        and bytes in proportion to the archive. Returns ``False`` when there was nothing to do
        (one segment and no deletions)."""
        with self._updating() as state:
            if len(state.segments) == 1 and not state.deleted and state.segments[0].path.startswith(SEGMENTS + "/"):
                return False
            segments, deleted = self._merged_segments(state, range(len(state.segments)),
                                                      segment_name(state.generation + 1), full=True)
            self._commit(state, segments, deleted=deleted, compact=False)
            return True

    def _set_alignment(self, alignment: Any) -> None:
        """Attach an image-text alignment (every segment merged into one with its text vectors; the
        alignment file kept as ``segments/align-<generation>.safetensors``) or detach it (``None``)."""
        with self._updating() as state:
            if alignment is None:
                self._commit(state, list(state.segments), alignment=(None, None), appended=True, compact=False)
                return
            ref = f"{SEGMENTS}/align-{state.generation + 1:08d}.safetensors"
            alignment.save(self.directory / ref)
            segments, deleted = self._merged_segments(state, range(len(state.segments)),
                                                      segment_name(state.generation + 1), full=True,
                                                      alignment=alignment)
            self._commit(state, segments, deleted=deleted, alignment=(alignment, ref), compact=False)

    def add(self, paths: Sequence[str | os.PathLike[str]], classes: Sequence[str | None] | None = None,
            *, batch_size: int = 32, progress: bool = False, max_pixels: int | None = None) -> list[ImageRecord]:
        """Index image files; returns the new records (duplicates of indexed files are skipped).

        Every file is decoded before anything is written: one unreadable file refuses the
        whole update (:class:`~landlens.errors.ImageReadError` naming it) and leaves the
        archive as it was. ``classes`` gives each file's class (``None``: unlabelled), each checked
        by :func:`validate_class_name`. ``max_pixels`` is the decode limit of :func:`load_query`.
        The new images form a segment of their own (cost in proportion to the batch).
        """
        files = [Path(p) for p in paths]
        if classes is not None and len(classes) != len(files):
            raise ArchiveError(f"{len(classes)} classes for {len(files)} images")
        labels = [validate_class_name(c) for c in classes] if classes is not None else [None] * len(files)
        for f in files:
            problem = file_problem(f)
            if problem is not None:
                raise ImageReadError(f, problem)
        described = [describe_file(f) for f in files]
        with self._updating() as state:
            return self._add_locked(state, files, labels, described, batch_size, progress, max_pixels)

    def _add_locked(self, state: Generation, files: list[Path], labels: list[str | None],
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
        added = utc_now()
        new = [ImageRecord(state.next_id + i, stored_path(f), image_name(str(f)), c, w, h, s, n, added)
               for i, (f, c, w, h, s, n) in enumerate(todo)]
        geo = {r.id: g for r, g in zip(new, chip_geo([r.path for r in new])) if g is not None}
        seg = self._write_segment(state, segment_name(state.generation + 1), x, new, geo, full=False)
        self._commit(state, [*state.segments, seg], next_id=state.next_id + len(new), appended=True)
        return new

    def add_scenes(self, scenes: Sequence[str | os.PathLike[str]], *, progress: bool = False,
                   max_pixels: int | None = None, **tiling: Any) -> list[ImageRecord]:
        """Tile georeferenced scenes and add their chips (unlabelled); returns the new records.

        ``tiling`` (``chip``, ``stride``, ``gsd``, ``bands``, ``nodata``, ``stretch``,
        ``resampling``, ``min_valid``; see :meth:`build_from_scenes`) defaults to the settings the
        archive was built with, if it was built from scenes. Chips already indexed are skipped.
        """
        from landlens.retrieval.geo import DEFAULT_TILING, tile_scenes

        given = {k: v for k, v in tiling.items() if v is not None}
        settings = {**DEFAULT_TILING, **(self._state.meta.get("tiling") or {}), **given}
        if "chip" in given and "stride" not in given:
            settings["stride"] = None  # another chip size: its own stride
        tiles = tile_scenes(scenes, progress=progress, **settings)
        refs = [str(c.ref) for t in tiles for c in t.chips]
        return self.add(refs, progress=progress, max_pixels=max_pixels)

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
        sha, size = sha256_file(src)
        with self._updating() as state:
            if sha in state.id_of_sha:
                return None
            dest = self.upload_path(sha, suffix)
            if not dest.is_file():
                with atomic_path(dest) as part:
                    shutil.copyfile(src, part)
            added = self._add_locked(state, [dest], labels, [(info.width, info.height, sha, size)], 32, False,
                                     max_pixels)
            return added[0]

    def remove(self, ids: Sequence[int]) -> int:
        """Drop images by id; returns how many were removed. Their ids join the generation's
        deletion set (cost in proportion to the batch); the compaction policy rewrites a segment
        once a quarter of it is deleted. Uploaded files (under ``uploads/``) of removed images are
        deleted by the clean-up that follows the update.
        """
        want = {int(i) for i in ids}
        if not want:
            return 0
        with self._updating() as state:
            unknown = sorted(i for i in want if i not in state.row_of)
            if unknown:
                raise ArchiveError(f"no image with id {unknown[0]} in the archive"
                                   + (f" (and {len(unknown) - 1} more unknown ids)" if len(unknown) > 1 else ""))
            if len(want) >= len(state.records):
                raise ArchiveError("cannot remove every image: an archive needs at least one; "
                                   "delete the folder instead")
            self._commit(state, list(state.segments), deleted=state.deleted | frozenset(want))
        return len(want)  # the clean-up after the update deleted their uploaded files

    def upload_path(self, sha256: str, suffix: str) -> Path:
        """Where an uploaded image with this content hash is kept (``uploads/<sha256><suffix>``)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArchiveError(f"not a sha256 digest: {sha256[:80]!r}")
        if suffix not in UPLOAD_SUFFIXES.values():
            raise ArchiveError(f"unsupported upload suffix {suffix!r}")
        d = self.directory / UPLOADS
        d.mkdir(exist_ok=True)
        return (d / f"{sha256}{suffix}").resolve()


__all__ = ["ArchiveUpdates"]
