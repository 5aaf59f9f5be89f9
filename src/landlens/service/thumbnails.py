"""Thumbnails of indexed images: a few fixed sizes rendered from one cached master per image.

A requested size is snapped to the smallest of :data:`THUMBNAIL_SIZES` that is at least as
large (:func:`thumbnail_size`), so a client cannot make the server decode an image once per
size. Each image is decoded once into a *master* (longest side :data:`MASTER_SIDE`, kept in a
byte-bounded LRU) from which every size is rendered; concurrent requests for the same image
share that one decode (single flight); at most ``max_decodes`` masters are decoded at a time
(default: one per CPU), and each decode first reserves its estimated bytes from the app's
decode budget (:mod:`landlens.service.budget`). Rendered JPEGs are kept in a
:class:`~landlens.service.caches.ThumbnailCache`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cachetools import LRUCache
from starlette.concurrency import run_in_threadpool

from landlens.errors import ImageReadError
from landlens.service.budget import WeightedSemaphore, decode_cost
from landlens.service.caches import ThumbnailCache
from landlens.service.common import ServiceError

logger = logging.getLogger("landlens.service")

THUMBNAIL_SIZES = (128, 256, 512)
"""The sizes thumbnails are rendered at (longest side, pixels)."""

MASTER_SIDE = max(THUMBNAIL_SIZES)
"""Longest side of the downscaled master every size of an image is rendered from."""

THUMBNAIL_QUALITY = 85
"""JPEG quality of thumbnails."""

DEFAULT_MASTER_CACHE_BYTES = 64 * 1024 * 1024
"""Bytes of decoded masters kept (about 85 masters of 512 x 512 RGB)."""


def thumbnail_size(requested: int) -> int:
    """The fixed size served for a requested size: the smallest of :data:`THUMBNAIL_SIZES`
    at least ``requested`` (the largest when none is)."""
    return next((s for s in THUMBNAIL_SIZES if s >= int(requested)), THUMBNAIL_SIZES[-1])


def _image_bytes(img: Any) -> int:
    return int(img.width) * int(img.height) * len(img.getbands())


class Thumbnailer:
    """Renders and caches thumbnails of indexed images (see the module docstring).

    Args:
        budget: the app's decode budget in bytes (:class:`~landlens.service.budget.WeightedSemaphore`).
        rgb_bands: returns the archive's ``rgb_bands`` (or ``None``) at the time of a decode.
        max_items: rendered thumbnails kept (JPEG bytes).
        master_bytes: bytes of decoded masters kept.
        max_decodes: masters decoded at a time (default: ``os.cpu_count()``).
    """

    def __init__(self, budget: WeightedSemaphore, rgb_bands: Callable[[], Sequence[int] | None] = lambda: None, *,
                 max_items: int = 1024, master_bytes: int = DEFAULT_MASTER_CACHE_BYTES,
                 max_decodes: int | None = None) -> None:
        self.budget = budget
        self.rgb_bands = rgb_bands
        self.cache = ThumbnailCache(max_items)
        self.decodes = WeightedSemaphore(max(1, int(max_decodes or os.cpu_count() or 1)))
        self.decoded = 0
        """Masters decoded so far."""
        self._masters: LRUCache | None = (LRUCache(int(master_bytes), getsizeof=_image_bytes)
                                          if master_bytes > 0 else None)
        self._masters_lock = threading.Lock()
        self._inflight: dict[tuple[int, str], asyncio.Task[Any]] = {}

    @property
    def hits(self) -> int:
        """Thumbnails served from the cache."""
        return self.cache.hits

    @property
    def misses(self) -> int:
        """Thumbnails rendered (not in the cache)."""
        return self.cache.misses

    async def get(self, record: Any, size: int) -> bytes:
        """JPEG bytes of ``record``'s image, longest side at most ``size`` (one of
        :data:`THUMBNAIL_SIZES`); 404 when its file cannot be read."""
        key = (int(record.id), int(size), str(record.sha256))
        data = self.cache.get(key)
        if data is not None:
            return data
        master = await self.master(record)
        data = await run_in_threadpool(self.render, master, size)
        self.cache.put(key, data)
        return data

    async def master(self, record: Any) -> Any:
        """The decoded master of ``record`` (cached; one decode shared by concurrent callers)."""
        key = (int(record.id), str(record.sha256))
        master = self._cached_master(key)
        if master is not None:
            return master
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._decode_master(key, record))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        # shielded: a client that goes away does not cancel the decode the others wait for
        return await asyncio.shield(task)

    def _finished(self, key: tuple[int, str], task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody waited for is not logged as lost

    def _cached_master(self, key: tuple[int, str]) -> Any:
        if self._masters is None:
            return None
        with self._masters_lock:
            return self._masters.get(key)

    async def _decode_master(self, key: tuple[int, str], record: Any) -> Any:
        async with self.decodes.hold(1):
            master = self._cached_master(key)  # decoded while this one waited (a later flight)
            if master is not None:
                return master
            cost = await run_in_threadpool(self._cost, record)
            # an indexed image larger than the whole budget decodes alone: the operator put it
            # in the archive, and refusing would leave it without a thumbnail for good
            async with self.budget.hold(min(cost, self.budget.total)):
                master = await run_in_threadpool(self._decode, record)
        if self._masters is not None and _image_bytes(master) <= self._masters.maxsize:
            with self._masters_lock:
                self._masters[key] = master
        return master

    def _unreadable(self, record: Any, exc: ImageReadError) -> ServiceError:
        logger.warning("thumbnail of image %s: %s", record.id, exc)
        return ServiceError(404, f"image {record.id}: its file cannot be read on the server")

    def _cost(self, record: Any) -> int:
        from landlens.data.io import probe_image

        try:
            info = probe_image(record.path)
        except ImageReadError as exc:
            raise self._unreadable(record, exc) from None
        return decode_cost(info.width, info.height, info.bands, info.dtype, info.format,
                           draft=(MASTER_SIDE, MASTER_SIDE))

    def _decode(self, record: Any) -> Any:
        from PIL import Image

        from landlens.data.io import load_rgb

        try:
            img = load_rgb(record.path, draft_size=(MASTER_SIDE, MASTER_SIDE), rgb_bands=self.rgb_bands())
        except ImageReadError as exc:
            raise self._unreadable(record, exc) from None
        img.thumbnail((MASTER_SIDE, MASTER_SIDE), Image.Resampling.LANCZOS)
        self.decoded += 1
        return img.convert("RGB")

    @staticmethod
    def render(master: Any, size: int) -> bytes:
        """JPEG bytes of ``master`` shrunk to a longest side of at most ``size`` (never enlarged)."""
        from PIL import Image

        img = master
        if max(master.size) > size:
            img = master.copy()
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        return buf.getvalue()


__all__ = ["DEFAULT_MASTER_CACHE_BYTES", "MASTER_SIDE", "THUMBNAIL_QUALITY", "THUMBNAIL_SIZES", "Thumbnailer",
           "thumbnail_size"]
