"""The landlens search service: a FastAPI app over a persistent archive (and a classifier).

:func:`create_app` loads everything once, at start-up: the
:class:`~landlens.retrieval.archive.Archive`, its feature extractor
(:meth:`~landlens.retrieval.archive.Archive.backbone`) and, optionally, a trained classifier
(:class:`~landlens.training.predict.Predictor` of a run directory). Requests never reload a
model.

Endpoints (all errors are JSON ``{"detail": "<one line>"}``):

==============================================  ==============================================
``GET /``                                       the web page (``static/index.html``)
``GET /static/{file}``                          page assets
``GET /api/health``                             status, image count, backbone, generation
``GET /api/classes``                            archive classes with counts; classifier classes
``POST /api/search``                            search with an uploaded image (``file``, ``k``,
                                                ``class``)
``GET /api/search/{id}``                        search with an indexed image (itself left out)
``POST /api/search/feedback``                   relevance feedback: refine a query (Rocchio) with
                                                images marked relevant / not relevant, re-search
``GET /api/images/{id}``                        one image's record
``GET /api/images/{id}/thumbnail?size=256``     JPEG thumbnail (ETag, cached)
``POST /api/classify``                          classify an uploaded image (``file``, ``top_k``)
``POST /api/images``                            add an upload to the archive (token)
``DELETE /api/images/{id}``                     remove an image (token)
==============================================  ==============================================

Relevance feedback (``POST /api/search/feedback``, :mod:`landlens.retrieval.feedback`): the
JSON body names the query (``{"id": N}`` for an indexed image, or ``{"vector_token": T}`` for
an uploaded one), the ids marked ``relevant`` and ``irrelevant``, ``k``, ``class`` and optional
Rocchio ``weights`` (``a``, ``b``, ``c``; defaults 1, 0.75, 0.15). An uploaded query's vector is
not in the index, so ``POST /api/search`` answers with an opaque ``query_token``: the server
keeps that query's embedding in a bounded in-memory LRU (:class:`QueryVectorCache`, 256
entries by default, keyed by a random 128-bit token; nothing is written to disk). A token
pushed out of the LRU (or from before a restart) is answered 410 ``query token expired``, and
the client uploads the image again. This keeps the search response small (no 1280 floats) and
lets clients name only things the server gave them. The refined query is always computed from
the original query and all marks (marks accumulate over rounds; the query does not drift);
results leave out the query id when the query is indexed, and keep the marked images.

Concurrency: the event loop never runs CPU work. Reading and decoding uploads, FAISS
searches, classification and thumbnails run in the thread pool; embeddings go through one
:class:`~landlens.service.batching.MicroBatcher`, so concurrent uploads share a forward pass.
Writes (add, remove) are serialised by a lock (the archive also locks across processes) and
publish a new generation atomically, so searches running meanwhile see the old or the new
archive.

Security: uploads are limited in bytes (the request body is cut off past the limit) and in
pixels (checked on the header before decoding), and their format is judged by content
(:mod:`landlens.service.uploads`); thumbnails exist only for indexed ids, so a client never
names a file; writes need ``Authorization: Bearer <token>`` (compared in constant time) and
are refused outright (403) when the server has no token; CORS headers are sent only for the
origins given. Unexpected errors answer 500 ``"internal error"``; the traceback goes to the
log, never to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from landlens.errors import ImageReadError, LandlensError, first_line
from landlens.service.batching import MicroBatcher
from landlens.service.uploads import SavedUpload, UploadError, decode_error, save_upload

logger = logging.getLogger("landlens.service")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest accepted upload (20 MiB)."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest accepted upload width x height (50 megapixels)."""

FORM_OVERHEAD_BYTES = 64 * 1024
"""Request body allowance beyond the upload itself (multipart boundaries and form fields)."""

THUMBNAIL_MIN, THUMBNAIL_MAX, THUMBNAIL_DEFAULT = 32, 512, 256
THUMBNAIL_QUALITY = 85
THUMBNAIL_CACHE_CONTROL = "public, max-age=3600"

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Folder of the web page (``index.html``, ``app.js``, ``style.css``)."""

_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
    ".ico": "image/x-icon", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}  # fmt: skip
_WRITE_ROUTE = re.compile(r"^/api/images(/[^/]*)?/?$")

WRITES_DISABLED = "writes are disabled: start the server with a token"

DEFAULT_QUERY_CACHE = 256
"""Uploaded query vectors kept for relevance feedback (LRU; ~5 KiB each at 1280 dimensions)."""

MAX_FEEDBACK_IDS = 200
"""Most ids one feedback request may mark (relevant and not relevant together)."""

QUERY_TOKEN_EXPIRED = "query token expired or unknown: search with the image again to get a new one"
_QUERY_TOKEN = r"^[A-Za-z0-9_-]{16,64}$"


# --------------------------------------------------------------------------- helpers


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


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _hit_dict(hit: Any) -> dict[str, Any]:
    d = hit.to_dict()
    d["distance"] = _finite(float(d["distance"]))
    d["score"] = _finite(float(d["score"]))
    d["thumbnail"] = f"/api/images/{hit.record.id}/thumbnail"
    return d


def _class_param(value: str | None) -> str | None:
    """A class name from a form or query field, checked as archives check class names
    (:func:`~landlens.retrieval.archive.validate_class_name`): ``""`` means none; odd names -> 422."""
    from landlens.retrieval.archive import validate_class_name

    try:
        return validate_class_name(value)
    except LandlensError as exc:
        raise ServiceError(422, f"class: {first_line(exc)}") from None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check_token(expected: str | None, authorization: str | None) -> tuple[int, str] | None:
    """``None`` when the request may write, else ``(status, detail)``: 403 when the server
    has no token, 401 when the header is missing or wrong (constant-time comparison)."""
    if expected is None:
        return 403, WRITES_DISABLED
    given = bearer_token(authorization)
    if given is None:
        return 401, "missing token: send 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        return 401, "invalid token"
    return None


def _error_headers(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": "Bearer"} if status == 401 else None


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = [t.strip() for t in if_none_match.split(",")]
    return any((t[2:] if t.startswith("W/") else t) == etag for t in tags)


class _WriteGuard:
    """ASGI middleware: refuses write requests without a valid token *before* their body is read.

    FastAPI parses a multipart body before it runs dependencies; this guard answers 401/403
    first, so an unauthenticated client cannot make the server receive an upload.
    """

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE") \
                and _WRITE_ROUTE.match(scope.get("path", "")):
            auth = None
            for key, value in scope.get("headers", ()):
                if key == b"authorization":
                    auth = value.decode("latin-1")
                    break
            refused = check_token(self.token, auth)
            if refused is not None:
                status, detail = refused
                response = JSONResponse({"detail": detail}, status_code=status, headers=_error_headers(status))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"upload too large: the limit is {limit} bytes")


class _BodyLimit:
    """ASGI middleware: a request body larger than ``max_body`` bytes is answered 413.

    A ``Content-Length`` over the limit is refused before any byte is read; a body sent in
    chunks is cut off at the first chunk past the limit.
    """

    def __init__(self, app: Any, max_body: int, upload_limit: int) -> None:
        self.app = app
        self.max_body = int(max_body)
        self.upload_limit = int(upload_limit)

    def _response(self) -> JSONResponse:
        return JSONResponse({"detail": f"upload too large: the limit is {self.upload_limit} bytes"},
                            status_code=413, headers={"Connection": "close"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                if declared is not None and declared > self.max_body:
                    await self._response()(scope, receive, send)
                    return
                break
        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge(self.upload_limit)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._response()(scope, receive, send)


# --------------------------------------------------------------------------- the service


class ThumbnailCache:
    """A thread-safe LRU of JPEG bytes keyed by ``(id, size, sha256)``."""

    def __init__(self, max_items: int = 1024) -> None:
        self.max_items = int(max_items)
        self._items: OrderedDict[tuple[int, int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int, str]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[int, int, str], data: bytes) -> None:
        if self.max_items <= 0:
            return
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class QueryVectorCache:
    """A thread-safe LRU of uploaded query embeddings keyed by random opaque tokens.

    :meth:`put` stores a vector (and what the search response said about the query) and
    returns a new URL-safe token of 128 random bits (:func:`secrets.token_urlsafe`); :meth:`get`
    returns the entry, or ``None`` once it was pushed out by ``max_items`` newer ones.
    """

    def __init__(self, max_items: int = DEFAULT_QUERY_CACHE) -> None:
        self.max_items = int(max_items)
        self._items: OrderedDict[str, tuple[np.ndarray, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, vector: np.ndarray, query: dict[str, Any]) -> str | None:
        """Keep ``vector`` (copied, read-only) with ``query``; the token, or ``None`` when the
        cache is disabled (``max_items <= 0``)."""
        if self.max_items <= 0:
            return None
        v = np.array(vector, dtype=np.float32).reshape(-1)
        v.setflags(write=False)
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._items[token] = (v, dict(query))
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return token

    def get(self, token: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        with self._lock:
            item = self._items.get(token)
            if item is not None:
                self._items.move_to_end(token)
            return item

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------- request bodies


class FeedbackQuery(BaseModel):
    """The query being refined: an indexed image (``id``) or an upload (``vector_token``)."""

    model_config = ConfigDict(extra="forbid")
    id: int | None = Field(None, ge=0, description="id of an indexed image")
    vector_token: str | None = Field(None, pattern=_QUERY_TOKEN,
                                     description="query_token of an upload search (POST /api/search)")


class FeedbackWeights(BaseModel):
    """Rocchio weights: q' = a q + b mean(relevant) - c mean(not relevant)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    a: float = Field(1.0, ge=0, le=100)
    b: float = Field(0.75, ge=0, le=100)
    c: float = Field(0.15, ge=0, le=100)


class FeedbackRequest(BaseModel):
    """Body of ``POST /api/search/feedback``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    query: FeedbackQuery
    relevant: list[int] = Field(default_factory=list, max_length=MAX_FEEDBACK_IDS, description="ids marked relevant")
    irrelevant: list[int] = Field(default_factory=list, max_length=MAX_FEEDBACK_IDS,
                                  description="ids marked not relevant")
    k: int = Field(12, ge=1, description="number of results")
    class_name: str | None = Field(None, alias="class", description="only images of this class")
    weights: FeedbackWeights | None = None


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
        query_cache: uploaded query vectors kept for relevance feedback (LRU).
        optimize: the backbone's forward pass: ``jit`` (traced and frozen once at start-up,
            checked against eager mode; eager when that fails), ``compile``, or ``none``.
    """

    def __init__(self, archive: Any, predictor: Any = None, *, token: str | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_k: int = 100, max_batch: int = 16, max_wait: float = 0.005,
                 thumbnail_cache: int = 1024, refresh_interval: float = 1.0,
                 query_cache: int = DEFAULT_QUERY_CACHE, optimize: str = "jit") -> None:
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
        self.thumbnails = ThumbnailCache(thumbnail_cache)
        self.queries = QueryVectorCache(query_cache)
        self.write_lock = threading.Lock()
        self._class_counts: tuple[int, dict[str, int]] | None = None

    def _warm_up(self) -> None:
        """One embedding of a grey image, so the first request does not pay for lazy set-up."""
        from PIL import Image

        try:
            side = int(getattr(self.archive.preprocessing, "input_size", 224) or 224)
            self.archive.embed([Image.new("RGB", (side, side), (128, 128, 128))])
        except Exception:  # noqa: BLE001 - a failed warm-up only costs the first request time
            logger.warning("embedding warm-up failed", exc_info=True)

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

    def thumbnail(self, record: Any, size: int) -> bytes:
        """JPEG bytes of an indexed image, longest side at most ``size`` (blocking, cached)."""
        from PIL import Image

        from landlens.data.io import load_rgb

        key = (int(record.id), int(size), str(record.sha256))
        data = self.thumbnails.get(key)
        if data is not None:
            return data
        bands = (self.archive.index.meta.get("identity", {}) or {}).get("rgb_bands")
        try:
            img = load_rgb(record.path, draft_size=(size, size), rgb_bands=bands)
        except ImageReadError as exc:
            logger.warning("thumbnail of image %s: %s", record.id, exc)
            raise ServiceError(404, f"image {record.id}: its file cannot be read on the server") from None
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        data = buf.getvalue()
        self.thumbnails.put(key, data)
        return data

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

    def marked_vectors(self, ids: Sequence[int], what: str) -> np.ndarray:
        """Archive vectors (n, dim) of marked ids; 404 naming the first id not in the archive."""
        vectors = []
        for i in ids:
            if not self.archive.has(i):
                raise ServiceError(404, f"{what}: no image with id {i} in the archive")
            try:
                vectors.append(self.archive.vector(i))
            except LandlensError:  # removed meanwhile
                raise ServiceError(404, f"{what}: no image with id {i} in the archive") from None
        return np.stack(vectors) if vectors else np.zeros((0, int(self.archive.dim)), np.float32)

    def refine(self, vector: np.ndarray, relevant: Sequence[int], irrelevant: Sequence[int],
               weights: Any) -> np.ndarray:
        """Rocchio's refined query (:func:`landlens.retrieval.feedback.rocchio`) of ``vector``
        with the marked archive images (blocking). On a Euclidean archive the unit result is
        scaled back to the query's length, so it lives where the raw database vectors do."""
        from landlens.retrieval.feedback import FeedbackError, rocchio

        rel = self.marked_vectors(relevant, "relevant")
        irr = self.marked_vectors(irrelevant, "irrelevant")
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        scale = 1.0
        if self.archive.metric != "cosine":
            scale = float(np.linalg.norm(q)) or 1.0
        try:
            return rocchio(q, rel, irr, a=weights.a, b=weights.b, c=weights.c, scale=scale)
        except FeedbackError as exc:
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


# --------------------------------------------------------------------------- the app


def _open_archive(archive: Any) -> Any:
    from landlens.retrieval.archive import Archive

    if isinstance(archive, (str, os.PathLike)):
        return Archive.open(archive)
    return archive


def _open_predictor(classifier_run: Any) -> Any:
    if classifier_run is None:
        return None
    if isinstance(classifier_run, (str, os.PathLike)):
        from landlens.training.predict import Predictor

        return Predictor(classifier_run)
    return classifier_run


def _validation_detail(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
    where = ".".join(loc) or "request"
    msg = str(err.get("msg", "invalid value")).splitlines()[0] if err.get("msg") else "invalid value"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}"


def create_app(archive: Any, *, classifier_run: Any = None, token: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               cors_origins: Sequence[str] = (), max_k: int = 100, threads: int | None = None,
               max_batch: int = 16, max_wait: float = 0.005, thumbnail_cache: int = 1024,
               refresh_interval: float = 1.0, query_cache: int = DEFAULT_QUERY_CACHE,
               rerank: str | None = None, optimize: str = "jit") -> FastAPI:
    """The search service app over an archive folder (or an open ``Archive``).

    Args:
        archive: archive folder (``landlens index build``) or an open
            :class:`~landlens.retrieval.archive.Archive`.
        classifier_run: run directory of a trained classifier (or a ``Predictor``); enables
            ``/api/classify`` and the ``classification`` of upload searches.
        token: write token (``Authorization: Bearer <token>``); ``None`` disables writes (403).
        max_upload_bytes: largest upload in bytes (413 beyond).
        max_pixels: largest upload width x height (413 beyond, checked before decoding).
        cors_origins: origins allowed to call the API from a browser; empty: no CORS headers.
        max_k: largest ``k`` a search may ask for (422 beyond).
        threads: size of the worker thread pool (``None``: AnyIO's default of 40).
        max_batch, max_wait: embedding micro-batch size and longest wait in seconds.
        thumbnail_cache: number of thumbnails kept in memory.
        refresh_interval: seconds between checks for a newer archive generation written by
            another process (``landlens index add`` while the server runs).
        query_cache: uploaded query vectors kept (LRU) so ``POST /api/search/feedback`` can
            refine them by their ``query_token``; 0 disables tokens (``query_token`` is null).
        rerank: unsupervised re-ranking of every search (``"aqe"``, ``"diffusion"``,
            ``"aqe+diffusion"``, ...; :meth:`~landlens.retrieval.archive.Archive.set_rerank`),
            fitted at start-up on the archive's vectors and again after each update.
        optimize: how the backbone runs: ``jit`` (default; traced and frozen at start-up and
            checked against eager mode), ``compile`` (``torch.compile``, slower start-up) or
            ``none`` (eager).

    Raises:
        ArchiveError, CheckpointError, LandlensError: the archive, its backbone or the
            classifier cannot be loaded (one line).
    """
    if token is not None and not token.strip():
        raise LandlensError("the write token is empty; give a non-empty token or none")
    if max_k < 1:
        raise LandlensError(f"max_k must be at least 1, got {max_k}")
    if max_upload_bytes < 1 or max_pixels < 1:
        raise LandlensError("upload limits must be positive")
    arch = _open_archive(archive)
    if rerank is not None:
        arch.set_rerank(rerank)
    predictor = _open_predictor(classifier_run)
    service = SearchService(arch, predictor, token=token.strip() if token else None,
                            max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_k=max_k,
                            max_batch=max_batch, max_wait=max_wait, thumbnail_cache=thumbnail_cache,
                            refresh_interval=refresh_interval, query_cache=query_cache, optimize=optimize)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if threads:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = int(threads)
        try:
            yield
        finally:
            service.close()

    from landlens import __version__

    app = FastAPI(title="landlens search service", version=__version__, lifespan=lifespan,
                  description="Search a remote-sensing image archive by example, classify scenes, "
                              "and (with a token) add or remove images.")
    app.state.service = service

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status,
                            headers=exc.headers or _error_headers(exc.status))

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(ImageReadError)
    async def _image_error(request: Request, exc: ImageReadError) -> JSONResponse:
        err = decode_error(exc)  # the reason only: the message would name a server path
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(LandlensError)
    async def _landlens_error(request: Request, exc: LandlensError) -> JSONResponse:
        return JSONResponse({"detail": first_line(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 413:
            detail = f"upload too large: the limit is {max_upload_bytes} bytes"
        if exc.status_code == 304 or exc.status_code < 200:
            return Response(status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return JSONResponse({"detail": detail.splitlines()[0] if detail else "error"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    # ------------------------------------------------------------------ middleware
    # first added = innermost: CORS (outermost) > token guard > body limit > app, so an
    # unauthenticated upload is refused (401/403) before its size is even looked at
    app.add_middleware(_BodyLimit, max_body=max_upload_bytes + FORM_OVERHEAD_BYTES, upload_limit=max_upload_bytes)
    app.add_middleware(_WriteGuard, token=service.token)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Server-Timing", "ETag"])

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        refused = check_token(service.token, authorization)
        if refused is not None:
            raise ServiceError(refused[0], refused[1])

    async def read_upload(file: UploadFile, timer: Timer) -> SavedUpload:
        t = time.perf_counter()
        saved = await run_in_threadpool(service.read_upload, file)
        timer.add("read", t)
        return saved

    def clamp_k(k: int, available: int) -> int:
        return max(0, min(int(k), available))

    # ------------------------------------------------------------------ page
    @app.get("/", include_in_schema=False)
    async def index_page() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ServiceError(404, "the web page is not installed (static/index.html missing)")
        return FileResponse(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if not _STATIC_NAME.match(name) or ".." in name:
            raise ServiceError(404, "no such file")
        path = STATIC_DIR / name
        if not path.is_file() or path.resolve().parent != STATIC_DIR:
            raise ServiceError(404, "no such file")
        media = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ read API
    @app.get("/api/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and a summary: image count, backbone, classifier, generation, writes."""
        await run_in_threadpool(service.refresh)
        a = service.archive
        return {"status": "ok", "images": len(a), "backbone": a.backbone_name,
                "classifier": service.predictor is not None, "generation": a.generation,
                "writable": service.token is not None, "rerank": a.rerank_info(), "forward": service.forward}

    @app.get("/api/classes", tags=["archive"])
    async def classes() -> dict[str, Any]:
        """Classes of the archive with image counts, and the classifier's classes (or null)."""
        await run_in_threadpool(service.refresh)
        counts = service.class_counts()
        return {"classes": [{"name": n, "count": int(c)} for n, c in counts.items()],
                "classifier_classes": list(service.predictor.classes) if service.predictor is not None else None}

    @app.post("/api/search", tags=["search"])
    async def search_upload(
        file: Annotated[UploadFile, File(description="query image (JPEG, PNG, TIFF, GIF, BMP or WebP)")],
        k: int = Form(12, ge=1, le=max_k, description="number of results"),  # max_k: not in an annotation
        class_name: Annotated[str | None, Form(alias="class", description="only images of this class")] = None,
    ) -> JSONResponse:
        """Search the archive with an uploaded image."""
        await run_in_threadpool(service.refresh)
        timer = Timer()
        cls = _class_param(class_name)
        service.check_class(cls)
        saved = await read_upload(file, timer)
        try:
            t = time.perf_counter()
            image = await run_in_threadpool(service.decode, saved)
            t = timer.add("decode", t)
            embed = asyncio.wrap_future(service.batcher.submit(image))
            classify = None
            if service.predictor is not None:
                n = len(service.predictor.classes)
                classify = asyncio.ensure_future(run_in_threadpool(service.classify, image, min(5, n)))
            try:
                vector = await embed
            except BaseException:
                if classify is not None:
                    classify.cancel()
                raise
            t = timer.add("embed", t)
            available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
            kk = clamp_k(k, available)
            hits = (await run_in_threadpool(service.archive.search_vectors, np.asarray(vector)[None], kk,
                                            class_name=cls))[0] if kk else []
            t = timer.add("search", t)
            classification = None
            if classify is not None:
                classification = await classify
                timer.add("classify", t)
        finally:
            await run_in_threadpool(saved.remove)
        query = {"id": None, "name": saved.name, "class": None, "width": image.width, "height": image.height}
        query_token = service.queries.put(np.asarray(vector), query)  # for relevance feedback
        timing = timer.finish()
        body = {"k": kk, "class": cls, "query": query, "query_token": query_token,
                "results": [_hit_dict(h) for h in hits], "classification": classification,
                "timing_ms": timing}
        return JSONResponse(body, headers={"Server-Timing": Timer.header(timing)})

    @app.get("/api/search/{image_id:int}", tags=["search"])
    async def search_indexed(
        image_id: Annotated[int, PathParam(ge=0, description="id of an indexed image")],
        k: int = Query(12, ge=1, le=max_k, description="number of results"),  # max_k: not in an annotation
        class_name: Annotated[str | None, Query(alias="class")] = None,
    ) -> JSONResponse:
        """Search the archive with an indexed image (the image itself is left out)."""
        await run_in_threadpool(service.refresh)
        timer = Timer()
        cls = _class_param(class_name)
        record = service.record_or_404(image_id)
        service.check_class(cls)
        available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
        if cls is None or record.class_name == cls:
            available -= 1
        kk = clamp_k(k, available)
        t = time.perf_counter()
        try:
            hits = await run_in_threadpool(service.archive.search_id, image_id, kk, class_name=cls) if kk else []
        except LandlensError:
            if not service.archive.has(image_id):
                raise ServiceError(404, f"no image with id {image_id} in the archive") from None
            raise
        timer.add("search", t)
        timing = timer.finish()
        q = record.to_dict()
        body = {"k": kk, "class": cls,
                "query": {key: q[key] for key in ("id", "name", "class", "width", "height")},
                "results": [_hit_dict(h) for h in hits], "classification": None, "timing_ms": timing}
        return JSONResponse(body, headers={"Server-Timing": Timer.header(timing)})

    @app.post("/api/search/feedback", tags=["search"])
    async def search_feedback(body: FeedbackRequest) -> JSONResponse:
        """Relevance feedback: refine the query with the images marked relevant and not
        relevant (Rocchio: q' = a q + b mean(relevant) - c mean(not relevant), on L2-normalised
        embeddings; defaults a=1, b=0.75, c=0.15) and search again. The query is an indexed
        image (``{"id": N}``, left out of the results) or an upload (``{"vector_token": T}``,
        the ``query_token`` of its ``POST /api/search``; 410 once expired). Marked images stay
        in the results. Send the original query and every mark so far on each round."""
        from landlens.retrieval.feedback import FeedbackError, RocchioWeights

        await run_in_threadpool(service.refresh)
        timer = Timer()
        q = body.query
        if (q.id is None) == (q.vector_token is None):
            raise ServiceError(422, "query: give exactly one of 'id' (an indexed image) or 'vector_token'")
        relevant = list(dict.fromkeys(int(i) for i in body.relevant))
        irrelevant = list(dict.fromkeys(int(i) for i in body.irrelevant))
        if not relevant and not irrelevant:
            raise ServiceError(422, "relevant, irrelevant: mark at least one image relevant or not relevant")
        if len(relevant) + len(irrelevant) > MAX_FEEDBACK_IDS:
            raise ServiceError(422, f"relevant, irrelevant: at most {MAX_FEEDBACK_IDS} marked images, "
                                    f"got {len(relevant) + len(irrelevant)}")
        both = sorted(set(relevant) & set(irrelevant))
        if both:
            raise ServiceError(422, f"image {both[0]} is marked both relevant and not relevant")
        if body.k > max_k:
            raise ServiceError(422, f"k: Input should be less than or equal to {max_k}")
        cls = _class_param(body.class_name)
        service.check_class(cls)
        w = body.weights or FeedbackWeights()
        try:
            weights = RocchioWeights(w.a, w.b, w.c)
        except FeedbackError as exc:
            raise ServiceError(422, f"weights: {first_line(exc)}") from None
        vector, query, query_id = await run_in_threadpool(service.query_vector, q)
        t = time.perf_counter()
        refined = await run_in_threadpool(service.refine, vector, relevant, irrelevant, weights)
        t = timer.add("refine", t)
        available = len(service.archive) if cls is None else service.class_counts().get(cls, 0)
        if query_id is not None and (cls is None or query.get("class") == cls):
            available -= 1
        kk = clamp_k(body.k, available)
        exclude = [query_id] if query_id is not None else None
        hits = (await run_in_threadpool(service.archive.search_vectors, refined[None], kk,
                                        class_name=cls, exclude=exclude))[0] if kk else []
        timer.add("search", t)
        timing = timer.finish()
        out = {"k": kk, "class": cls, "query": query,
               "query_token": q.vector_token if query_id is None else None,
               "results": [_hit_dict(h) for h in hits], "classification": None,
               "feedback": {"method": "rocchio", "weights": weights.to_dict(),
                            "relevant": relevant, "irrelevant": irrelevant},
               "timing_ms": timing}
        return JSONResponse(out, headers={"Server-Timing": Timer.header(timing)})

    @app.get("/api/images/{image_id:int}", tags=["archive"])
    async def image_record(image_id: Annotated[int, PathParam(ge=0)]) -> dict[str, Any]:
        """The record of one indexed image (no server path)."""
        await run_in_threadpool(service.refresh)
        return service.record_or_404(image_id).to_dict()

    @app.get("/api/images/{image_id:int}/thumbnail", tags=["archive"],
             responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "not modified"}})
    async def thumbnail(
        image_id: Annotated[int, PathParam(ge=0)],
        size: Annotated[int, Query(ge=THUMBNAIL_MIN, le=THUMBNAIL_MAX)] = THUMBNAIL_DEFAULT,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        """A JPEG thumbnail of an indexed image, longest side at most ``size`` pixels."""
        timer = Timer()
        record = service.record_or_404(image_id)
        etag = f'"{record.sha256}-{size}"'
        headers = {"ETag": etag, "Cache-Control": THUMBNAIL_CACHE_CONTROL}
        if _etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        t = time.perf_counter()
        data = await run_in_threadpool(service.thumbnail, record, size)
        timer.add("thumbnail", t)
        headers["Server-Timing"] = Timer.header(timer.finish())
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.post("/api/classify", tags=["classify"])
    async def classify_upload(
        file: Annotated[UploadFile, File(description="image to classify")],
        top_k: Annotated[int, Form(ge=1, le=1000, description="number of classes returned")] = 5,
    ) -> JSONResponse:
        """Classify an uploaded image with the loaded classifier (404 when there is none)."""
        if service.predictor is None:
            raise ServiceError(404, "no classifier loaded: start the server with --run RUN_DIR")
        timer = Timer()
        saved = await read_upload(file, timer)
        try:
            t = time.perf_counter()
            image = await run_in_threadpool(service.decode, saved)
            t = timer.add("decode", t)
            result = await run_in_threadpool(service.classify, image,
                                             min(int(top_k), len(service.predictor.classes)))
            timer.add("classify", t)
        finally:
            await run_in_threadpool(saved.remove)
        timing = timer.finish()
        return JSONResponse({**result, "timing_ms": timing}, headers={"Server-Timing": Timer.header(timing)})

    # ------------------------------------------------------------------ write API
    @app.post("/api/images", status_code=201, tags=["archive"], dependencies=[Depends(require_token)])
    async def add_image(
        file: Annotated[UploadFile, File(description="image to add")],
        class_name: Annotated[str | None, Form(alias="class", description="its class (optional)")] = None,
    ) -> JSONResponse:
        """Add an uploaded image to the archive (needs the token). 409 when it is already there."""
        timer = Timer()
        cls = _class_param(class_name)
        saved = await read_upload(file, timer)
        try:
            t = time.perf_counter()
            record = await run_in_threadpool(service.add_upload, saved, cls)
            timer.add("add", t)
        finally:
            await run_in_threadpool(saved.remove)
        timing = timer.finish()
        return JSONResponse({**record.to_dict(), "thumbnail": f"/api/images/{record.id}/thumbnail"},
                            status_code=201,
                            headers={"Location": f"/api/images/{record.id}", "Server-Timing": Timer.header(timing)})

    @app.delete("/api/images/{image_id:int}", tags=["archive"], dependencies=[Depends(require_token)])
    async def delete_image(image_id: Annotated[int, PathParam(ge=0)]) -> dict[str, int]:
        """Remove an image from the archive (needs the token)."""
        removed = await run_in_threadpool(service.remove, image_id)
        return {"removed": removed}

    return app


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_QUERY_CACHE",
    "MAX_FEEDBACK_IDS",
    "STATIC_DIR",
    "FeedbackQuery",
    "FeedbackRequest",
    "FeedbackWeights",
    "QueryVectorCache",
    "SearchService",
    "ServiceError",
    "ThumbnailCache",
    "bearer_token",
    "check_token",
    "create_app",
]
