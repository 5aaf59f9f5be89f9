"""Bounding the memory of concurrent image decodes: a byte budget the requests wait for.

A 150 KiB PNG can hold 49 megapixels: the size of an upload says nothing about what decoding
it costs. Every decode (an upload's, or an indexed image's for its thumbnail) first estimates
its cost from the header (:func:`decode_cost`: width x height x bands x bytes per sample, plus
the 8-bit RGB image it becomes; 392 MiB for a 49-megapixel RGB PNG) and reserves that many bytes of a :class:`WeightedSemaphore`
shared by the whole app; it gives them back when the decoded pixels are no longer needed.
Requests that do not fit wait, first come first served; a request that alone needs more than
the whole budget is refused at once (an upload: 413), since waiting would never help.

The same class, with weight 1 per decode, limits how many thumbnails decode at a time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

DEFAULT_DECODE_BUDGET_BYTES = 1024 * 1024 * 1024
"""Bytes that concurrent decodes may hold together by default (1 GiB: two 49-megapixel RGB
images at once)."""

PIL_PIXEL_BYTES = 4
"""Bytes of one pixel of a Pillow ``RGB`` (or ``RGBA``, ``LA``) image: stored as 32 bits."""

JPEG_DRAFT_SCALES = (8, 4, 2, 1)
"""Scales at which Pillow's JPEG decoder can skip detail (``Image.draft``)."""


def jpeg_draft_scale(width: int, height: int, target: tuple[int, int] | None) -> int:
    """The scale Pillow's ``draft`` picks to decode a JPEG for ``target`` (the largest of 8, 4,
    2, 1 that keeps both sides at least the target); 1 without a target."""
    if not target:
        return 1
    tw, th = max(1, int(target[0])), max(1, int(target[1]))
    fit = min(width // tw, height // th)
    return next((s for s in JPEG_DRAFT_SCALES if s <= fit), 1)


def decode_cost(width: int, height: int, bands: int = 3, dtype: str = "uint8", fmt: str | None = None,
                draft: tuple[int, int] | None = None) -> int:
    """Estimated peak bytes of decoding an image to 8-bit RGB: the decoded samples
    (``width x height x bands x bytes per sample``; Pillow keeps 2 to 4 8-bit bands in 4 bytes
    a pixel) plus the RGB image made from them (4 bytes a pixel in Pillow), and a float32 RGB
    copy when samples wider than 8 bits are stretched. A JPEG decoded for a ``draft`` size
    counts the pixels at the draft scale."""
    scale = jpeg_draft_scale(width, height, draft) if fmt == "JPEG" else 1
    pixels = -(-int(width) // scale) * -(-int(height) // scale)
    itemsize = np.dtype(dtype).itemsize
    bands = max(1, int(bands))
    samples = PIL_PIXEL_BYTES if itemsize == 1 and 2 <= bands <= 4 else bands * itemsize
    per_pixel = samples + PIL_PIXEL_BYTES + (12 if itemsize > 1 else 0)
    return int(pixels) * per_pixel


class WeightedSemaphore:
    """An asyncio semaphore whose holders take ``weight`` units of ``total``, first come first
    served (a large request at the head is not overtaken by smaller ones behind it).

    Its state is plain counters and the futures of the waiting requests, so one instance may
    serve the event loops of successive servers (tests), one at a time.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"total must be at least 1, got {total}")
        self.total = int(total)
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    def fits(self, weight: int) -> bool:
        """Whether ``weight`` can ever be held (it is at most ``total``)."""
        return 0 <= weight <= self.total

    async def acquire(self, weight: int) -> None:
        """Wait until ``weight`` units are free (and every earlier request was served); take them."""
        weight = int(weight)
        if not self.fits(weight):
            raise ValueError(f"weight {weight} is more than the total {self.total}")
        if not self._waiters and self.in_use + weight <= self.total:
            self._take(weight)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as it was cancelled
                self.release(weight)
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # a large request leaving the head may let smaller ones in
            raise

    def release(self, weight: int) -> None:
        """Give back ``weight`` units (wakes the requests that now fit, in order)."""
        self.in_use -= int(weight)
        self._wake()

    @asynccontextmanager
    async def hold(self, weight: int) -> AsyncIterator[None]:
        """``async with sem.hold(n):`` acquire ``n`` units, release them on leaving."""
        await self.acquire(weight)
        try:
            yield
        finally:
            self.release(weight)

    def _take(self, weight: int) -> None:
        self.in_use += weight
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters:
            weight, future = self._waiters[0]
            if future.done():  # cancelled while queued (removed by its own task soon)
                self._waiters.popleft()
                continue
            if self.in_use + weight > self.total:
                return
            self._waiters.popleft()
            self._take(weight)
            future.set_result(None)


def mib(n: int) -> str:
    """Bytes as MiB with one decimal (``"147.0 MiB"``)."""
    return f"{n / (1024 * 1024):.1f} MiB"


__all__ = ["DEFAULT_DECODE_BUDGET_BYTES", "WeightedSemaphore", "decode_cost", "jpeg_draft_scale", "mib"]
