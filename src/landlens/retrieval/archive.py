"""A persistent, updatable search archive: the one search object of landlens.

An :class:`Archive` is a folder (layout and crash guarantees in
:mod:`landlens.retrieval.generations`) of segments, each a FAISS index
(:class:`~landlens.retrieval.index.SearchIndex`), its vectors and a catalog of images with
stable ids (:mod:`landlens.retrieval.segments`). It is built from a folder of class sub-folders (:meth:`Archive.build`) or a feature
store (:meth:`Archive.from_store`), searched by image, vector or id (:meth:`Archive.search`),
optionally re-ranked without labels or by a learned matching discriminator, refined by
relevance feedback, searched by words once an image-text alignment is attached
(:mod:`landlens.retrieval.textsearch`), and updated in place (:mod:`landlens.retrieval.updates`:
:meth:`Archive.add`, :meth:`Archive.remove`, :meth:`Archive.compact`).
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

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from landlens.retrieval.search import ArchiveHit, ArchiveSearch
from landlens.retrieval.textsearch import ArchiveTextSearch
from landlens.retrieval.updates import ArchiveUpdates
from landlens.retrieval.generations import (
    CURRENT, FEATURES, GEN_PREFIX, LOCK, UPLOADS, ArchiveError, GeoRecord, Generation, ImageRecord,
    UnknownImageError, chip_geo, collect_garbage, describe_file, file_lock, generation_name, image_name, is_archive,
    load_current, read_current, utc_now, validate_class_name, write_generation,
)
from landlens.retrieval.segments import segment_name, write_segment


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


class Archive(ArchiveUpdates, ArchiveSearch, ArchiveTextSearch):
    """An on-disk archive of indexed images that can be searched and updated (module docstring;
    searching in :class:`~landlens.retrieval.search.ArchiveSearch`, words in
    :class:`~landlens.retrieval.textsearch.ArchiveTextSearch`, updates in
    :class:`~landlens.retrieval.updates.ArchiveUpdates`).

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
        index = build_index_from_store(store, kind=index_factory, metric=metric, scratch=outp.parent, **index_settings)
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

    def id_of_sha256(self, sha256: str) -> int | None:
        """The id of the indexed image with this content hash, if any."""
        return self._state.id_of_sha.get(sha256)

    def __repr__(self) -> str:
        return (f"Archive({str(self.directory)!r}, generation={self.generation}, images={len(self)}, "
                f"backbone={self.backbone_name!r}, index={self.factory!r})")


__all__ = ["Archive", "ArchiveError", "ArchiveHit", "GeoRecord", "ImageRecord", "is_archive", "validate_class_name"]
