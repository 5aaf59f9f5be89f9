"""A persistent, updatable search archive: the one search object of landlens.

An :class:`Archive` is a folder (layout and crash guarantees in
:mod:`landlens.retrieval.generations`) holding a FAISS index
(:class:`~landlens.retrieval.index.SearchIndex`), the vectors and a catalog of images with
stable ids. It is built from a folder of class sub-folders (:meth:`Archive.build`) or a feature
store (:meth:`Archive.from_store`), searched by image, vector or id (:meth:`Archive.search`),
optionally re-ranked without labels or by a learned matching discriminator, refined by
relevance feedback, searched by words once an image-text alignment is attached
(:mod:`landlens.retrieval.textsearch`), and updated in place (:meth:`Archive.add`, :meth:`Archive.remove`).
``landlens index``, ``landlens search`` and ``landlens serve`` are thin shells over it.

Image ids are stable integers that are never reused. An update writes only what it changes:
adding images writes a segment of their own (vectors, catalog rows, a small exact index),
removing them writes their ids into the generation's deletion set, so both cost time and bytes
in proportion to the batch; searches merge the segments' results. Segments are merged by the
compaction policy after updates (:func:`~landlens.retrieval.segments.plan_merges`) and all at
once by :meth:`Archive.compact` (``landlens index compact``), which rebuilds the index with the
archive's settings (IVF kinds retrained).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from landlens.atomic import atomic_path
from landlens.data.io import file_problem
from landlens.errors import ImageReadError
from landlens.retrieval.search import ArchiveHit, ArchiveSearch
from landlens.retrieval.textsearch import ArchiveTextSearch
from landlens.retrieval.generations import (
    CURRENT, FEATURES, GEN_PREFIX, LOCK, UPLOAD_SUFFIXES, UPLOADS, ArchiveError, GeoRecord, Generation, ImageRecord,
    UnknownImageError, chip_geo, collect_garbage, describe_file, file_lock, generation_name, image_name, is_archive,
    load_current, load_generation, read_current, sha256_file, stored_path, utc_now, validate_class_name,
    write_generation,
)
from landlens.retrieval.segments import (
    SEGMENTS, Segment, plan_merges, segment_index_settings, segment_name, write_segment,
)


def _check_out(outp: Path, overwrite: bool) -> None:
    """Refuse to write an archive over a file, a folder of something else, or (without
    ``overwrite``) an existing archive."""
    if outp.exists() and not outp.is_dir():
        raise ArchiveError(f"{outp} exists and is not a folder; choose another --out")
    if outp.is_dir() and not is_archive(outp) and any(p.name not in (FEATURES, LOCK) for p in outp.iterdir()):
        raise ArchiveError(f"{outp} exists and is not an archive folder; choose another --out")
    if is_archive(outp) and not overwrite:
        raise ArchiveError(f"{outp} already holds an archive; use --overwrite to rebuild it, "
                           f"or `landlens index add` to add images")


class Archive(ArchiveSearch, ArchiveTextSearch):
    """An on-disk archive of indexed images that can be searched and updated (module docstring).

    Open one with :meth:`open` or create one with :meth:`build`. Searches and record lookups
    may run from many threads at once; :meth:`add` and :meth:`remove` are serialised (also
    across processes) and publish their result at the end, so readers see the old or the new
    archive, never a mixture.
    """

    def __init__(self, directory: Path, state: Generation) -> None:
        self.directory = Path(directory)
        self._state = state
        self._write_lock = threading.Lock()
        self._backbone_lock = threading.Lock()
        self._backbone: Any = None
        self._fast: Any = None  # a prepared forward pass of the backbone (:meth:`optimize`)
        self._init_search()
        self._init_text()

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> "Archive":
        """Load the live generation of the archive in ``directory``."""
        d = Path(directory)
        if not d.is_dir():
            raise ArchiveError(f"no archive at {d} (not a folder)")
        state = load_current(d)
        if state is None:
            raise ArchiveError(f"no archive at {d} (missing {CURRENT}); create one with `landlens index build`")
        return cls(d, state)

    @classmethod
    def build(cls, data: str | os.PathLike[str], out: str | os.PathLike[str], *, dataset: str | None = None,
              backbone: str = "fusion", weights: str = "auto", index_factory: str = "auto",
              metric: str = "cosine", rerank: str | None = "auto", cache_dir: str | os.PathLike[str] | None = None,
              workers: int | None = None, progress: bool = True, overwrite: bool = False,
              engine: str = "local", address: str | None = None, actors: int | None = None) -> "Archive":
        """Index every readable image of the class-folder dataset ``data`` into a new archive ``out``.

        Features come from ``backbone`` (with ``weights``) through a feature store in
        ``cache_dir`` (default ``runs/features``, the cache every landlens command shares; an
        existing store of the same images and
        extractor is reused); classes are the sub-folder names. ``index_factory`` is any
        :class:`~landlens.retrieval.index.SearchIndex` kind or FAISS factory string. An existing
        archive at ``out`` is refused unless ``overwrite``, which replaces it atomically.

        The defaults are the best measured unsupervised pipeline: the ``fusion`` backbone
        (:mod:`landlens.models.fusion`) and ``rerank="auto"``, k-reciprocal re-ranking recorded as
        the archive's default for every search (:func:`~landlens.retrieval.rerank.archive_rerank`).
        ``backbone="tf_efficientnet_lite0", rerank=None`` is the plain single-backbone archive.
        ``engine="ray"`` extracts on Ray Data (``address``, ``actors``:
        :mod:`landlens.features.ray_engine`) into the same cache.
        """
        from landlens.data.folder import scan_folder
        from landlens.features.cache import DEFAULT_CACHE_DIR, ensure_features
        from landlens.models.registry import create_backbone

        outp = Path(out)
        _check_out(outp, overwrite)
        ds = scan_folder(data, dataset)
        bb = create_backbone(backbone, weights)
        store_dir, _ = ensure_features(ds, bb, cache_dir=Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR,
                                       workers=workers, progress=progress, command="landlens index build",
                                       engine=engine, address=address, actors=actors)
        return cls.from_store(store_dir, outp, index_factory=index_factory, metric=metric, rerank=rerank,
                              overwrite=overwrite)

    @classmethod
    def build_from_scenes(cls, scenes: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                          chip: int = 256, stride: int | None = None, gsd: float | None = None,
                          bands: Sequence[int] | None = None, nodata: float | None = None, stretch: str = "auto",
                          resampling: str | None = None, min_valid: float = 0.5,
                          backbone: str = "fusion", weights: str = "auto", index_factory: str = "auto",
                          metric: str = "cosine", rerank: str | None = "auto",
                          cache_dir: str | os.PathLike[str] | None = None, workers: int | None = None,
                          progress: bool = True, overwrite: bool = False, engine: str = "local",
                          address: str | None = None, actors: int | None = None) -> "Archive":
        """Tile georeferenced scenes (GeoTIFF, COG, any CRS) into chips and index them into a new
        archive ``out`` whose catalog records, for every chip, its scene, pixel window and
        footprint in the scene CRS and in WGS84 (:mod:`landlens.retrieval.geo`).

        Tiling (:func:`landlens.scenes.tiling.tile_scene`): ``chip``-pixel windows every ``stride``
        pixels (default ``chip``) of each scene's grid at ``gsd`` metres (default: its own pixels),
        showing ``bands`` (1-based), with the radiometric mapping ``stretch`` computed once per scene;
        windows with less than ``min_valid`` of their pixels holding data (``nodata``: a value
        meaning none, for files that declare none) are skipped. Chips are unlabelled. The other
        arguments are those of :meth:`build`.
        """
        from landlens.features.cache import DEFAULT_CACHE_DIR, ensure_features
        from landlens.models.registry import create_backbone
        from landlens.retrieval.geo import scene_dataset

        outp = Path(out)
        _check_out(outp, overwrite)
        tiling = {"chip": int(chip), "stride": int(stride) if stride else None, "gsd": gsd,
                  "bands": list(bands) if bands is not None else None, "nodata": nodata, "stretch": stretch,
                  "resampling": resampling, "min_valid": float(min_valid)}
        ds, _ = scene_dataset(scenes, progress=progress, **tiling)
        bb = create_backbone(backbone, weights)
        store_dir, _ = ensure_features(ds, bb, cache_dir=Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR,
                                       workers=workers, progress=progress, command="landlens index build",
                                       engine=engine, address=address, actors=actors)
        return cls.from_store(store_dir, outp, index_factory=index_factory, metric=metric, rerank=rerank,
                              overwrite=overwrite, extra_meta={"tiling": tiling})

    @classmethod
    def from_store(cls, store: str | os.PathLike[str], out: str | os.PathLike[str], *, index_factory: str = "auto",
                   metric: str = "cosine", rerank: str | None = None, overwrite: bool = False,
                   extra_meta: dict[str, Any] | None = None, **index_settings: Any) -> Archive:
        """An archive ``out`` over the valid rows of a complete feature store (``landlens
        features extract``): the store's images, classes and extractor, which queries are
        embedded with. ``index_settings`` (``nprobe``, ``ef_search``, ``seed``...) go to the
        :class:`~landlens.retrieval.index.SearchIndex`; ``overwrite`` as in :meth:`build`.
        Chips of scenes among the images are located (the catalog's ``geo`` table); an empty
        class name means unlabelled; ``extra_meta`` is recorded with the archive's meta; ``rerank``
        is the archive's default re-ranking (``"auto"``, a spec, or ``None``: plain searches)."""
        from landlens.features.store import FeatureStore
        from landlens.retrieval.rerank import archive_rerank
        from landlens.retrieval.index import build_index_from_store

        outp = Path(out)
        _check_out(outp, overwrite)
        index = build_index_from_store(store, kind=index_factory, metric=metric, **index_settings)
        index.paths_ = index.labels_ = index.classes_ = None  # the catalog names the rows
        fs = FeatureStore(store).load().only_valid()
        default_rerank = archive_rerank(rerank, len(fs), metric)
        root = Path(fs.meta["dataset"]["root"])
        files = [root / p for p in fs.paths]
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            described = list(pool.map(describe_file, files))
        added = utc_now()
        records = [ImageRecord(i, str(f), image_name(str(f)), fs.classes[int(y)] or None, w, h, s, n, added)
                   for i, (f, y, (w, h, s, n)) in enumerate(zip(files, fs.labels, described))]
        geo = {r.id: g for r, g in zip(records, chip_geo([r.path for r in records])) if g is not None}
        meta = {"data_root": str(root), "dataset": fs.meta.get("dataset", {}).get("name"), "created": added,
                "feature_store": str(Path(store).resolve()), "classes": [c for c in fs.classes if c],
                "index_settings": index.get_params(),
                **({"rerank": default_rerank} if default_rerank else {}), **(extra_meta or {})}
        with file_lock(outp):
            old = read_current(outp)
            gen = int(old[len(GEN_PREFIX):]) + 1 if old else 1
            seg = write_segment(outp, segment_name(gen), index, np.asarray(fs.features, dtype=np.float32), records, geo)
            state = Generation(gen, [seg], frozenset(), len(records), meta)
            write_generation(outp, state, int(old[len(GEN_PREFIX):]) if old else None)
            collect_garbage(outp, state)
        return cls.open(outp)

    def reload(self) -> bool:
        """Load a newer generation written by another process; ``True`` when one was loaded."""
        name = read_current(self.directory)
        if name is None or int(name[len(GEN_PREFIX):]) == self._state.generation:
            return False
        with self._write_lock:
            state = load_current(self.directory, reuse=self._state)
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
        """The live index (do not modify it): the :class:`~landlens.retrieval.index.SearchIndex` of
        an archive of one segment without deletions, else a
        :class:`~landlens.retrieval.segments.SegmentIndex` searching the live rows of all segments."""
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
            raise UnknownImageError(f"no image with id {id} in the archive")
        return state.records[row]

    def records(self) -> list[ImageRecord]:
        """Every record, in index row order."""
        return list(self._state.records)

    @property
    def meta(self) -> dict[str, Any]:
        """What the archive records about how it was made (data root, dataset, tiling of scenes...)."""
        return dict(self._state.meta)

    def geo(self, id: int) -> GeoRecord | None:
        """Where the image ``id`` lies when it is a chip of a scene (``None`` for an image file)."""
        if int(id) not in self._state.row_of:
            raise UnknownImageError(f"no image with id {id} in the archive")
        return self._state.geo.get(int(id))

    def located(self) -> dict[int, GeoRecord]:
        """Every chip of a scene in the archive: image id -> :class:`GeoRecord`."""
        return dict(self._state.geo)

    def locate(self, lon: float, lat: float) -> list[ImageRecord]:
        """The chips whose window contains the WGS84 point ``(lon, lat)``, the one whose centre is
        nearest the point first (:func:`landlens.retrieval.geo.chips_at`)."""
        from landlens.retrieval.geo import chips_at

        return [loc.record for loc in chips_at(self, lon, lat)]

    def vector(self, id: int) -> np.ndarray:
        state = self._state
        row = state.row_of.get(int(id))
        if row is None:
            raise UnknownImageError(f"no image with id {id} in the archive")
        return np.array(state.vectors[row], dtype=np.float32)

    def feature_set(self) -> Any:
        """The archive's labelled images as a :class:`~landlens.features.store.FeatureSet` (vectors,
        classes, the extractor's identity), ready for :func:`landlens.retrieval.evaluate.evaluate`;
        unlabelled images are left out."""
        from landlens.features.store import FeatureSet

        state = self._state
        keep = [i for i, r in enumerate(state.records) if r.class_name]
        classes = sorted({state.records[i].class_name for i in keep})
        index = {c: k for k, c in enumerate(classes)}
        meta = {"identity": state.index.meta.get("identity", {}), "backbone": state.index.meta.get("backbone", {}),
                "dataset": {"name": state.meta.get("dataset"), "root": str(self.directory), "classes": classes},
                "archive": {"directory": str(self.directory), "generation": state.generation}}
        return FeatureSet(np.asarray(state.vectors[keep], dtype=np.float32), [state.records[i].path for i in keep],
                          np.asarray([index[state.records[i].class_name] for i in keep], dtype=np.int64), classes, meta,
                          np.ones(len(keep), bool))

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: size, classes, extractor, index, disk use."""
        state = self._state
        meta = state.index.meta
        used = [self.directory / generation_name(state.generation), *(self.directory / s.path for s in state.segments),
                *([self.directory / state.alignment_ref] if state.alignment_ref else [])]
        disk = sum(f.stat().st_size for p in used for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
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
            "segments": len(state.segments),
            "deleted": len(state.deleted),
            "uploads": sum(1 for p in uploads.iterdir() if p.stem in state.id_of_sha) if uploads.is_dir() else 0,
            "text": self.text_info(),
            "chips": len(state.geo),
            "scenes": sorted({g.scene for g in state.geo.values()}),
            "tiling": state.meta.get("tiling"),
            "rerank": self.rerank,
        }

    # ------------------------------------------------------------------ embedding and searching
    def use_weights(self, weights: str) -> None:
        """Rebuild the feature extractor from other weights (any ``create_backbone`` weights
        argument, e.g. a checkpoint that moved); they must have the recorded digest."""
        from landlens.retrieval.extractor import backbone_for_index

        with self._backbone_lock:
            self._backbone = backbone_for_index(self._state.index, weights).eval()
            self._fast = None

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Override the index's search settings (IVF lists visited, HNSW beam width) for this
        object's searches; the archive on disk keeps its own."""
        index = self._state.index
        if nprobe is not None:
            index.nprobe = int(nprobe)
        if ef_search is not None:
            index.ef_search = int(ef_search)

    def backbone(self) -> Any:
        """The archive's feature extractor, rebuilt once from the recorded weights and checked."""
        if self._backbone is None:
            with self._backbone_lock:
                if self._backbone is None:
                    from landlens.retrieval.extractor import backbone_for_index

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

        ``mode`` is that of :func:`landlens.features.inference.optimize_for_inference` (``jit``:
        traced, frozen, batch-norm folded, channels-last; ``compile``; ``none``); the prepared
        graph is checked against eager mode on seeded noise images first, and a ``jit`` graph
        that cannot be prepared leaves eager mode in place. Returns the mode in use:
        ``'jit'``, ``'compile'`` or ``'eager'``.
        """
        from landlens.features.inference import prepared_forward

        if mode not in ("jit", "compile", "none"):
            raise ArchiveError(f"unknown forward-pass mode {mode!r}: use jit, compile or none")
        bb = self.backbone()
        # jit falls back to eager where tracing fails; compile fails loudly
        self._fast = prepared_forward(bb, bb.preprocessing, mode)
        return "eager" if self._fast is None else mode

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Features (n, dim) float32 of RGB PIL images under the archive's extractor (the
        prepared forward pass after :meth:`optimize`)."""
        from landlens.retrieval.extractor import embed_images

        return np.ascontiguousarray(embed_images(self.backbone(), list(images), forward=self._fast), dtype=np.float32)

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
        index.fit(vectors)
        al = state.alignment if alignment is None else alignment
        if text is None and al is not None:
            text = al.images(vectors)
        return write_segment(self.directory, name, index, vectors, records, geo, text)

    def _merged_segments(self, state: Generation, members: Sequence[int], name: str, *, full: bool = False,
                         alignment: Any = None) -> tuple[list[Segment], frozenset[int]]:
        """``state``'s segments with those at positions ``members`` rewritten as one segment
        ``name`` (deleted images left out) in the place of the first, and the deletion set left;
        ``alignment``: project the text vectors with this one instead of keeping the segments'."""
        parts = [(state.segments[i], state.live[i]) for i in members]
        records = [r for s, lv in parts for r in (s.records if lv is None else [s.records[i] for i in lv])]
        ids = {int(i) for s, _ in parts for i in s.ids}
        segments = [s for i, s in enumerate(state.segments) if i not in set(members)]
        if records:
            vectors = np.concatenate([np.asarray(s.vectors if lv is None else s.vectors[lv], dtype=np.float32)
                                      for s, lv in parts])
            text = None
            if alignment is None and state.alignment is not None:
                text = np.concatenate([np.asarray(s.text if lv is None else s.text[lv], dtype=np.float32)
                                       for s, lv in parts])
            geo = {r.id: s.geo[r.id] for s, _ in parts for r in records if r.id in s.geo}
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

    def id_of_sha256(self, sha256: str) -> int | None:
        """The id of the indexed image with this content hash, if any."""
        return self._state.id_of_sha.get(sha256)

    def __repr__(self) -> str:
        return (f"Archive({str(self.directory)!r}, generation={self.generation}, images={len(self)}, "
                f"backbone={self.backbone_name!r}, index={self.factory!r})")


__all__ = ["Archive", "ArchiveError", "ArchiveHit", "GeoRecord", "ImageRecord", "is_archive", "validate_class_name"]
