"""Thread-safe LRU caches of the service (:mod:`cachetools` behind a lock): rendered
thumbnails, and uploaded query vectors kept for relevance feedback."""

from __future__ import annotations

import secrets
import threading
from typing import Any

import numpy as np
from cachetools import LRUCache

DEFAULT_QUERY_CACHE = 256
"""Uploaded query vectors kept for relevance feedback (LRU; ~5 KiB each at 1280 dimensions)."""


class ThumbnailCache:
    """A thread-safe LRU of JPEG bytes keyed by ``(id, size, sha256)``, counting hits and misses."""

    def __init__(self, max_items: int = 1024) -> None:
        self.max_items = int(max_items)
        self._items: LRUCache | None = LRUCache(self.max_items) if self.max_items > 0 else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int, str]) -> bytes | None:
        with self._lock:
            data = self._items.get(key) if self._items is not None else None
            if data is None:
                self.misses += 1
            else:
                self.hits += 1
            return data

    def put(self, key: tuple[int, int, str], data: bytes) -> None:
        if self._items is None:
            return
        with self._lock:
            self._items[key] = data

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0


class QueryVectorCache:
    """A thread-safe LRU of uploaded query embeddings keyed by random opaque tokens.

    :meth:`put` stores a vector (and what the search response said about the query) and
    returns a new URL-safe token of 128 random bits (:func:`secrets.token_urlsafe`); :meth:`get`
    returns the entry, or ``None`` once it was pushed out by ``max_items`` newer ones.
    """

    def __init__(self, max_items: int = DEFAULT_QUERY_CACHE) -> None:
        self.max_items = int(max_items)
        self._items: LRUCache | None = LRUCache(self.max_items) if self.max_items > 0 else None
        self._lock = threading.Lock()

    def put(self, vector: np.ndarray, query: dict[str, Any]) -> str | None:
        """Keep ``vector`` (copied, read-only) with ``query``; the token, or ``None`` when the
        cache is disabled (``max_items <= 0``)."""
        if self._items is None:
            return None
        v = np.array(vector, dtype=np.float32).reshape(-1)
        v.setflags(write=False)
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._items[token] = (v, dict(query))
        return token

    def get(self, token: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The ``(vector, query)`` of a token (now the most recently used), or ``None``."""
        if self._items is None:
            return None
        with self._lock:
            return self._items.get(token)

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0


__all__ = ["DEFAULT_QUERY_CACHE", "QueryVectorCache", "ThumbnailCache"]
