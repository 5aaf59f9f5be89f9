"""Small pieces every part of the service uses: the error it raises, request timings, the
JSON form of a hit, request parameters and conditional requests."""

from __future__ import annotations

import math
import time
from typing import Any

from landlens.errors import LandlensError, first_line
from landlens.retrieval.generations import validate_class_name


class ServiceError(Exception):
    """An HTTP error answered with ``{"detail": detail}`` (raised inside the service)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status = int(status)
        self.detail = detail
        self.headers = headers
        super().__init__(detail)


class Timer:
    """Named durations of one request, for ``timing_ms`` and the ``Server-Timing`` header."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ms: dict[str, float] = {}

    def add(self, name: str, since: float) -> float:
        """Add the time since ``since`` (a ``perf_counter`` value) to ``name``; returns now."""
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - since) * 1000.0
        return now

    def finish(self) -> dict[str, float]:
        """All durations plus ``total``, rounded to 0.1 ms."""
        out = {k: round(v, 1) for k, v in self.ms.items()}
        out["total"] = round((time.perf_counter() - self.start) * 1000.0, 1)
        return out

    @staticmethod
    def header(timing: dict[str, float]) -> str:
        """The ``Server-Timing`` header value (``decode;dur=3.1, embed;dur=21.0, ...``)."""
        return ", ".join(f"{k};dur={v:.1f}" for k, v in timing.items())


def finite(x: float) -> float | None:
    """``x`` as a float, or ``None`` when it is infinite or NaN (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


def hit_dict(hit: Any, place: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON form of a search hit, with its thumbnail URL and, for a chip of a scene, its
    ``place`` (scene index and window; ``null`` otherwise)."""
    d = hit.to_dict()
    d["distance"] = finite(float(d["distance"]))
    d["score"] = finite(float(d["score"]))
    d["thumbnail"] = f"/api/images/{hit.record.id}/thumbnail"
    d["place"] = place
    return d


def class_param(value: str | None) -> str | None:
    """A class name from a form or query field, checked as archives check class names
    (:func:`~landlens.retrieval.generations.validate_class_name`, also what the CLI applies):
    ``""`` means none; long or odd names -> 422."""
    try:
        return validate_class_name(value)
    except LandlensError as exc:
        raise ServiceError(422, f"class: {first_line(exc)}") from None


def clamp_k(k: int, available: int) -> int:
    """``k`` limited to ``0 ... available``."""
    return max(0, min(int(k), available))


def error_headers(status: int) -> dict[str, str] | None:
    """Headers of an error response: ``WWW-Authenticate`` on a 401."""
    return {"WWW-Authenticate": "Bearer"} if status == 401 else None


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak tags compare equal; ``*`` matches)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = [t.strip() for t in if_none_match.split(",")]
    return any((t.removeprefix("W/")) == etag for t in tags)


__all__ = [
    "ServiceError",
    "Timer",
    "clamp_k",
    "class_param",
    "error_headers",
    "etag_matches",
    "finite",
    "hit_dict",
]
