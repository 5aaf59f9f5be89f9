"""What the service holds and the blocking work it does: :class:`SearchService`.

The routes (:mod:`landlens.service.routes`) reach it through the :func:`get_service`
dependency; it is created once by :func:`landlens.service.app.create_app`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import Request, UploadFile
from starlette.concurrency import run_in_threadpool

from landlens.errors import ImageReadError, LandlensError, first_line
from landlens.service.batching import MicroBatcher
from landlens.service.budget import DEFAULT_DECODE_BUDGET_BYTES, WeightedSemaphore, decode_cost, mib
from landlens.service.caches import DEFAULT_QUERY_CACHE, QueryVectorCache
from landlens.service.common import ServiceError, Timer, hit_dict
from landlens.service.models import FeedbackQuery
from landlens.service.thumbnails import Thumbnailer
from landlens.service.uploads import SavedUpload, UploadError, decode_error, save_upload

logger = logging.getLogger("landlens.service")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest accepted upload (20 MiB)."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest accepted upload width x height (50 megapixels)."""

QUERY_TOKEN_EXPIRED = "query token expired or unknown: search with the image again to get a new one"


class SearchService:
    """What the app holds: the archive, its extractor, the classifier, the batcher, limits.

    Args:
        archive: an open :class:`~landlens.retrieval.archive.Archive`.
        predictor: a :class:`~landlens.training.predict.Predictor`, or ``None``.
        token: the write token, or ``None`` (writes disabled).
        max_upload_bytes, max_pixels: upload limits.
        max_k: largest ``k`` a search may ask for.
        max_batch, max_wait: micro-batching settings of the embedding batcher.
        thumbnail_cache: thumbnails kept in memory.
        decode_budget_bytes: bytes that concurrent decodes (uploads and thumbnails) may hold
            together (:mod:`landlens.service.budget`); an upload that alone needs more is 413.
        thumbnail_decodes: thumbnail masters decoded at a time (default: one per CPU).
        query_cache: uploaded query vectors kept for relevance feedback (LRU).
        optimize: the backbone's forward pass: ``jit`` (traced and frozen once at start-up,
            checked against eager mode; eager when that fails), ``compile``, or ``none``.
    """

    def __init__(self, archive: Any, predictor: Any = None, *, token: str | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_k: int = 100, max_batch: int = 16, max_wait: float = 0.005,
                 thumbnail_cache: int = 1024, refresh_interval: float = 1.0,
                 query_cache: int = DEFAULT_QUERY_CACHE, optimize: str = "jit",
                 decode_budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES, thumbnail_decodes: int | None = None) -> None:
        self.archive = archive
        self.refresh_interval = float(refresh_interval)
        self._last_refresh = time.monotonic()
        self.predictor = predictor
        self.token = token
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        self.max_k = int(max_k)
        self.backbone = archive.backbone()  # load (and check) the extractor now, not on the first request
        self.forward = archive.optimize(optimize)
        self._warm_up()
        self.batcher: MicroBatcher = MicroBatcher(self._embed_batch, max_batch=max_batch, max_wait=max_wait,
                                                  name="landlens-embed")
        self.budget = WeightedSemaphore(decode_budget_bytes)
        self.thumbnails = Thumbnailer(self.budget, self._rgb_bands, max_items=thumbnail_cache,
                                      max_decodes=thumbnail_decodes)
        self.queries = QueryVectorCache(query_cache)
        self.write_lock = threading.Lock()
        self._class_counts: tuple[int, dict[str, int]] | None = None
        self._scenes: tuple[int, list[dict[str, Any]], dict[str, int]] | None = None
        self.overviews: dict[tuple[str, str], bytes] = {}  # scene overview PNGs, a few

    def _warm_up(self) -> None:
        """One embedding of a grey image (and one text encoding when the archive answers text
        queries), so the first request does not pay for lazy set-up."""
        from PIL import Image

        try:
            side = int(getattr(self.archive.preprocessing, "input_size", 224) or 224)
            self.archive.embed([Image.new("RGB", (side, side), (128, 128, 128))])
        except Exception:  # noqa: BLE001 - a failed warm-up only costs the first request time
            logger.warning("embedding warm-up failed", exc_info=True)
        if self.archive.has_text:
            self.archive.text_space().queries(["an aerial image"])  # a text tower that cannot load fails now

    def refresh(self) -> None:
        """Pick up a generation written by another process (``landlens index add``), checking
        the archive's ``CURRENT`` pointer at most once per ``refresh_interval`` seconds."""
        now = time.monotonic()
        if now - self._last_refresh < self.refresh_interval:
            return
        self._last_refresh = now
        try:
            if self.archive.reload():
                logger.info("archive reloaded: generation %s, %s images", self.archive.generation,
                            len(self.archive))
        except LandlensError:
            logger.warning("archive reload failed; serving the loaded generation", exc_info=True)

    # ------------------------------------------------------------ work done in threads
    def _embed_batch(self, images: list[Any]) -> np.ndarray:
        return self.archive.embed(images)

    def read_upload(self, upload: UploadFile) -> SavedUpload:
        """Copy an upload to a temporary file and check bytes, format and pixels (blocking)."""
        upload.file.seek(0)
        return save_upload(upload.file, max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels,
                           name=upload.filename)

    async def receive(self, upload: UploadFile, timer: Timer) -> SavedUpload:
        """:meth:`read_upload` in the thread pool, timed as ``read``."""
        t = time.perf_counter()
        saved = await run_in_threadpool(self.read_upload, upload)
        timer.add("read", t)
        return saved

    def decode_cost(self, saved: SavedUpload) -> int:
        """Estimated bytes of decoding a checked upload (as :meth:`decode` does); 413 when that
        alone is more than the whole decode budget."""
        pre = self.archive.preprocessing
        need = getattr(pre, "input_size", None) if getattr(pre, "resize_mode", None) == "squash" \
            else getattr(pre, "resize_size", None)
        cost = decode_cost(saved.width, saved.height, saved.bands, saved.dtype, saved.format,
                           draft=(int(need), int(need)) if need else None)
        if not self.budget.fits(cost):
            raise UploadError(413, f"image too large to decode here: {saved.width}x{saved.height} pixels need about "
                                   f"{mib(cost)}, more than the server's decode budget of {mib(self.budget.total)}")
        return cost

    @asynccontextmanager
    async def decoding(self, saved: SavedUpload) -> AsyncIterator[None]:
        """``async with service.decoding(saved):`` hold the upload's share of the decode budget
        (waiting for it first) while its pixels are in memory; 413 when it can never fit."""
        async with self.budget.hold(self.decode_cost(saved)):
            yield

    async def on_upload(self, upload: UploadFile, timer: Timer, work: Any, name: str) -> Any:
        """Receive an upload, decode it under the decode budget, run the blocking ``work(image)``
        in the thread pool (timed as ``name``) and delete the saved file: what a route that
        answers from one uploaded image does. The pixels are dropped before the budget is."""
        saved = await self.receive(upload, timer)
        try:
            t = time.perf_counter()
            async with self.decoding(saved):  # the decode budget, held while the pixels live
                t = timer.add("wait", t)
                image = await run_in_threadpool(self.decode, saved)
                t = timer.add("decode", t)
                result = await run_in_threadpool(work, image)
                del image
                timer.add(name, t)
        finally:
            await run_in_threadpool(saved.remove)
        return result

    def _rgb_bands(self) -> Any:
        return (self.archive.index.meta.get("identity", {}) or {}).get("rgb_bands")

    def decode(self, saved: SavedUpload) -> Any:
        """Decode a checked upload as the archive decodes its images (blocking)."""
        try:
            return self.archive.load_query(saved.path, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            raise decode_error(exc) from None

    def classify(self, image: Any, top_k: int) -> dict[str, Any]:
        """``{"predictions": [{"class", "probability"}...]}`` of one decoded image (blocking)."""
        pred = self.predictor.predict_images([image], top_k)[0]
        return {"predictions": [{"class": c, "probability": float(p)}
                                for c, p in zip(pred.labels, pred.probabilities)]}

    def record_or_404(self, image_id: int) -> Any:
        if not self.archive.has(image_id):
            raise ServiceError(404, f"no image with id {image_id} in the archive")
        try:
            return self.archive.record(image_id)
        except LandlensError:  # removed between the two calls
            raise ServiceError(404, f"no image with id {image_id} in the archive") from None

    def class_counts(self) -> dict[str, int]:
        """The archive's class counts, computed once per generation (not once per request)."""
        gen = self.archive.generation
        cached = self._class_counts
        if cached is None or cached[0] != gen:
            cached = (gen, dict(self.archive.class_counts()))
            self._class_counts = cached
        return cached[1]

    def scenes(self) -> list[dict[str, Any]]:
        """The archive's scenes (:func:`landlens.retrieval.geo.archive_scenes`, with their
        ``index`` in that list), once per generation; empty for an archive without chips."""
        return self._scene_table()[0]

    def _scene_table(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """``(scenes, scene path -> index)``, computed once per generation."""
        gen = self.archive.generation
        cached = self._scenes
        if cached is None or cached[0] != gen:
            scenes: list[dict[str, Any]] = []
            if self.archive.located():
                from landlens.retrieval.geo import archive_scenes

                scenes = [{**sc, "index": i} for i, sc in enumerate(archive_scenes(self.archive))]
            cached = (gen, scenes, {sc["path"]: sc["index"] for sc in scenes})
            self._scenes = cached
        return cached[1], cached[2]

    def _place(self, scene: str, window: Sequence[int]) -> dict[str, Any] | None:
        index = self._scene_table()[1].get(scene)
        return None if index is None else {"scene": index, "window": list(window)}

    def place_of(self, image_id: int) -> dict[str, Any] | None:
        """``{"scene": index, "window": [col, row, width, height]}`` of a chip, else ``None``."""
        geo = self.archive.geo(image_id)
        return None if geo is None else self._place(geo.scene, geo.window)

    def place_of_ref(self, ref: str) -> dict[str, Any] | None:
        """The ``place`` (scene index and window) of a chip reference of an archive scene."""
        from landlens.scenes.refs import parse_chip_ref

        chip = parse_chip_ref(ref)
        return None if chip is None else self._place(chip.scene, chip.window)

    def hits_json(self, hits: Sequence[Any]) -> list[dict[str, Any]]:
        """The JSON of search hits (:func:`~landlens.service.common.hit_dict`), each chip with its
        scene index and window (``place``) for the page's scene view."""
        located = bool(self._scene_table()[1])
        return [hit_dict(h, self.place_of(h.record.id) if located else None) for h in hits]

    def check_class(self, class_name: str | None) -> None:
        if class_name is not None and class_name not in self.class_counts():
            raise ServiceError(422, f"class {class_name!r} is not in the archive")

    def query_vector(self, query: FeedbackQuery) -> tuple[np.ndarray, dict[str, Any], int | None]:
        """``(vector, query description, indexed id or None)`` of a feedback query: an indexed
        image (404 when unknown) or an uploaded query's token (410 once it left the LRU)."""
        if query.id is not None:
            record = self.record_or_404(query.id)
            try:
                vector = self.archive.vector(query.id)
            except LandlensError:  # removed meanwhile
                raise ServiceError(404, f"no image with id {query.id} in the archive") from None
            q = record.to_dict()
            return vector, {key: q[key] for key in ("id", "name", "class", "width", "height")}, int(query.id)
        item = self.queries.get(str(query.vector_token))
        if item is None:
            raise ServiceError(410, QUERY_TOKEN_EXPIRED)
        return item[0], dict(item[1]), None

    def refine(self, vector: np.ndarray, relevant: Sequence[int], irrelevant: Sequence[int],
               weights: Any) -> np.ndarray:
        """Rocchio's refined query of ``vector`` with the marked archive images
        (:meth:`~landlens.retrieval.search.ArchiveSearch.refine`, blocking): 404 naming an id not
        in the archive, 422 when nothing is left of the query."""
        from landlens.retrieval.feedback import FeedbackError
        from landlens.retrieval.generations import UnknownImageError

        try:
            return self.archive.refine(vector, relevant, irrelevant, weights)
        except UnknownImageError as exc:
            raise ServiceError(404, first_line(exc)) from None
        except (FeedbackError, LandlensError) as exc:
            raise ServiceError(422, first_line(exc)) from None

    def add_upload(self, saved: SavedUpload, class_name: str | None) -> Any:
        """Store a checked upload as ``uploads/<sha256><ext>`` and index it (blocking, locked)."""
        with self.write_lock:
            existing = self.archive.id_of_sha256(saved.sha256)
            if existing is not None:
                raise ServiceError(409, f"this image is already in the archive as id {existing}")
            self.decode(saved)  # a truncated or corrupt file is refused before anything is written
            record = self.archive.add_upload(saved.path, class_name, max_pixels=self.max_pixels)
            if record is None:
                existing = self.archive.id_of_sha256(saved.sha256)
                raise ServiceError(409, f"this image is already in the archive as id {existing}")
            return record

    def remove(self, image_id: int) -> int:
        with self.write_lock:
            self.record_or_404(image_id)
            try:
                self.archive.remove([image_id])
            except LandlensError as exc:
                if not self.archive.has(image_id):
                    raise ServiceError(404, f"no image with id {image_id} in the archive") from None
                raise ServiceError(409, first_line(exc)) from None
        return image_id

    def close(self) -> None:
        """Stop the embedding batcher (requests already queued finish first)."""
        self.batcher.close()


def get_service(request: Request) -> SearchService:
    """FastAPI dependency: the app's :class:`SearchService`."""
    return request.app.state.service


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "QUERY_TOKEN_EXPIRED",
    "SearchService",
    "get_service",
]
