"""The landlens search service: a FastAPI app over a persistent archive (and a classifier).

:func:`create_app` loads everything once, at start-up: the
:class:`~landlens.retrieval.archive.Archive`, its feature extractor
(:meth:`~landlens.retrieval.archive.Archive.backbone`) and, optionally, a trained classifier
(:class:`~landlens.training.predict.Predictor` of a run directory). Requests never reload a
model.

The app is assembled here from its parts: :class:`~landlens.service.state.SearchService` (what
the app holds and the blocking work), the routers of :mod:`landlens.service.routes` (which reach
the service through the :func:`~landlens.service.state.get_service` dependency), the ASGI
middlewares of :mod:`landlens.service.middleware` and the caches of
:mod:`landlens.service.caches`.

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
``GET /api/images/{id}/thumbnail?size=256``     JPEG thumbnail, 128/256/512 (ETag, cached)
``POST /api/classify``                          classify an uploaded image (``file``, ``top_k``)
``POST /api/images``                            add an upload to the archive (token)
``DELETE /api/images/{id}``                     remove an image (token)
``GET /docs``                                   API docs (Swagger UI from the package)
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

Memory: every decode (an upload's, a thumbnail master's) first reserves its estimated bytes
from one decode budget (:mod:`landlens.service.budget`) and holds them while its pixels live;
requests past the budget wait, first come first served, and an upload that alone needs more
than the budget is answered 413. Thumbnails come in three sizes (128, 256, 512) rendered from
one cached 512 px master per image; concurrent requests for one image share one decode, and
at most one master per CPU is decoded at a time (:mod:`landlens.service.thumbnails`).

Security: uploads are limited in bytes (the request body is cut off past the limit) and in
pixels (checked on the header before decoding), and their format is judged by content
(:mod:`landlens.service.uploads`); thumbnails exist only for indexed ids, so a client never
names a file; writes need ``Authorization: Bearer <token>`` (compared in constant time) and
are refused outright (403) when the server has no token; CORS headers are sent only for the
origins given. Only the configured ``Host`` names are answered (``allowed_hosts``: DNS
rebinding); every answer carries ``nosniff``, ``X-Frame-Options: DENY`` and a
Content-Security-Policy without inline code (``/docs`` has its own, allowing Swagger UI's
start-up script by hash; its files are served from the ``swagger-ui-py`` package, never a CDN);
a request body that stalls or takes too long is answered 408
(:class:`~landlens.service.middleware.BodyTimeout`). Unexpected errors answer 500
``"internal error"``; the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from landlens.errors import ImageReadError, LandlensError, first_line
from landlens.service.auth import WRITES_DISABLED, bearer_token, check_token
from landlens.service.budget import DEFAULT_DECODE_BUDGET_BYTES
from landlens.service.caches import (
    DEFAULT_QUERY_CACHE,
    QueryVectorCache,
    ThumbnailCache,
)
from landlens.service.common import ServiceError, error_headers
from landlens.service.middleware import (DEFAULT_BODY_TIMEOUT, DEFAULT_READ_TIMEOUT, BodyLimit, BodyTimeout,
                                         SecurityHeaders, WriteGuard)
from landlens.service.models import (
    MAX_FEEDBACK_IDS,
    FeedbackQuery,
    FeedbackRequest,
    FeedbackWeights,
)
from landlens.service.routes import images, info, page, scenes
from landlens.service.routes.docs import DOCS_URL, docs_csp, docs_router
from landlens.service.routes.page import STATIC_DIR, PageFiles
from landlens.service.routes.search import search_router
from landlens.service.routes.words import words_router
from landlens.service.state import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    QUERY_TOKEN_EXPIRED,
    SearchService,
)
from landlens.service.uploads import UploadError, decode_error

logger = logging.getLogger("landlens.service")

FORM_OVERHEAD_BYTES = 64 * 1024
"""Request body allowance beyond the upload itself (multipart boundaries and form fields)."""

DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
"""``Host`` names accepted by default: this machine's own (IPv6 with and without brackets)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
"""The policy of the web page and of every other answer but the API docs: scripts, styles and
requests from this server only (no inline code; ``blob:`` images are the page's preview of the
chosen query file, ``data:`` its empty favicon), never framed."""


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


def validation_detail(exc: RequestValidationError) -> str:
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
               rerank: str | None = None, optimize: str = "jit",
               decode_budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES, thumbnail_decodes: int | None = None,
               allowed_hosts: Sequence[str] | None = None, read_timeout: float | None = DEFAULT_READ_TIMEOUT,
               body_timeout: float | None = DEFAULT_BODY_TIMEOUT) -> FastAPI:
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
        thumbnail_cache: number of thumbnails kept in memory (JPEGs of the fixed sizes 128,
            256 and 512; every size of an image is rendered from one decoded 512 px master).
        refresh_interval: seconds between checks for a newer archive generation written by
            another process (``landlens index add`` while the server runs).
        query_cache: uploaded query vectors kept (LRU) so ``POST /api/search/feedback`` can
            refine them by their ``query_token``; 0 disables tokens (``query_token`` is null).
        rerank: unsupervised re-ranking of every search (``"aqe"``, ``"diffusion"``,
            ``"aqe+diffusion"``, ...; :meth:`~landlens.retrieval.archive.Archive.set_rerank`),
            fitted at start-up on the archive's vectors (or restored from the archive's
            ``rerank/`` folder when an earlier process fitted it) and again after each update.
        optimize: how the backbone runs: ``jit`` (default; traced and frozen at start-up and
            checked against eager mode), ``compile`` (``torch.compile``, slower start-up) or
            ``none`` (eager).
        decode_budget_bytes: bytes that concurrent image decodes (uploads and thumbnails) may
            hold together, estimated from each image's header (width x height x bands x bytes
            per sample, plus its 8-bit RGB copy); requests past it wait their turn, and an
            upload that alone needs more is answered 413.
        thumbnail_decodes: thumbnail masters decoded at a time (``None``: one per CPU);
            concurrent requests for one image share one decode.
        allowed_hosts: host names the ``Host`` header may carry (Starlette's
            ``TrustedHostMiddleware``; with or without a port; ``*.example.org`` patterns;
            ``"*"`` accepts any); others are answered 400, so a page of another site cannot
            reach the server through DNS rebinding. ``None``: :data:`DEFAULT_ALLOWED_HOSTS`
            (this machine's names; ``landlens serve`` adds the ``--host`` it binds).
        read_timeout: longest wait in seconds for the next chunk of a request body;
            ``body_timeout``: longest time a whole body may take; past either the request is
            answered 408 (``None`` or 0: no limit).

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
    hosts = list(DEFAULT_ALLOWED_HOSTS if allowed_hosts is None else allowed_hosts)
    for host in hosts:
        if not isinstance(host, str) or not host or ("*" in host[1:]) or (host.startswith("*") and host != "*"
                                                                          and not host.startswith("*.")):
            raise LandlensError(f"allowed host {host!r}: give a host name, '*.domain' or '*'")
    if decode_budget_bytes < 1 or (thumbnail_decodes is not None and thumbnail_decodes < 1):
        raise LandlensError("the decode budget and thumbnail_decodes must be positive")
    arch = _open_archive(archive)
    # the given re-ranking, else the archive's recorded default, fitted now rather than at the first search
    arch.set_rerank(arch.rerank if rerank is None else rerank)
    predictor = _open_predictor(classifier_run)
    service = SearchService(arch, predictor, token=token.strip() if token else None,
                            max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_k=max_k,
                            max_batch=max_batch, max_wait=max_wait, thumbnail_cache=thumbnail_cache,
                            refresh_interval=refresh_interval, query_cache=query_cache, optimize=optimize,
                            decode_budget_bytes=decode_budget_bytes, thumbnail_decodes=thumbnail_decodes)

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

    title = "landlens search service"
    app = FastAPI(title=title, version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search a remote-sensing image archive by example, classify scenes, "
                              "and (with a token) add or remove images.")
    app.state.service = service

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status,
                            headers=exc.headers or error_headers(exc.status))

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
        return JSONResponse({"detail": validation_detail(exc)}, status_code=422)

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
    # first added = innermost. From the outside in: security headers (on every answer, the
    # refusals below included) > trusted hosts > CORS > token guard (an unauthenticated upload
    # is refused before its body is read) > body timeouts > body limit > app
    app.add_middleware(BodyLimit, max_body=max_upload_bytes + FORM_OVERHEAD_BYTES, upload_limit=max_upload_bytes)
    app.add_middleware(BodyTimeout, read_timeout=read_timeout, body_timeout=body_timeout)
    app.add_middleware(WriteGuard, token=service.token)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Server-Timing", "ETag"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    docs_policy = docs_csp(title, app.openapi_url or "/openapi.json")
    app.add_middleware(SecurityHeaders, csp=CONTENT_SECURITY_POLICY,
                       csp_for=lambda path: docs_policy if path.startswith(DOCS_URL) else None)

    # ------------------------------------------------------------------ routes
    app.include_router(page.router)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
    app.include_router(info.router)
    app.include_router(search_router(max_k))
    app.include_router(words_router(max_k))
    app.include_router(images.router)
    app.include_router(scenes.router)
    app.include_router(docs_router(title, app.openapi_url or "/openapi.json"))
    return app


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_DECODE_BUDGET_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_QUERY_CACHE",
    "FORM_OVERHEAD_BYTES",
    "MAX_FEEDBACK_IDS",
    "QUERY_TOKEN_EXPIRED",
    "STATIC_DIR",
    "WRITES_DISABLED",
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
    "validation_detail",
]
