"""ASGI middlewares of the service: the write guard, the request body limit, the request
body timeouts and the security headers of every response.

They are plain ASGI callables (not ``BaseHTTPMiddleware``), so they see a request before
FastAPI reads its body, and wrap ``receive`` to watch the body as it arrives.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from landlens.service.auth import check_token
from landlens.service.common import error_headers

WRITE_ROUTE = re.compile(r"^/api/images(/[^/]*)?/?$")
"""Paths whose POST, PUT, PATCH and DELETE requests need the write token."""


def header_value(scope: Any, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower-case bytes), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def run_or_answer(app: Any, scope: Any, receive: Any, send: Any, error: type[Exception],
                        answer: Callable[[Any], Any]) -> None:
    """Run ``app``; when it raises ``error`` before its response has started, send ``answer(exc)``
    (an ASGI response) instead; once the response has started the error propagates."""
    started = False

    async def tracking_send(message: Any) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, tracking_send)
    except error as exc:
        if started:
            raise
        await answer(exc)(scope, receive, send)


class WriteGuard:
    """ASGI middleware: refuses write requests without a valid token *before* their body is read.

    FastAPI parses a multipart body before it runs dependencies; this guard answers 401/403
    first, so an unauthenticated client cannot make the server receive an upload.
    """

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE") \
                and WRITE_ROUTE.match(scope.get("path", "")):
            refused = check_token(self.token, header_value(scope, b"authorization"))
            if refused is not None:
                status, detail = refused
                response = JSONResponse({"detail": detail}, status_code=status, headers=error_headers(status))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when the body passes the limit (an ``HTTPException``, so that
    FastAPI's body parsing lets it through instead of answering 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"upload too large: the limit is {limit} bytes")


class BodyLimit:
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
        length = header_value(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > self.max_body:
                await self._response()(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.upload_limit)
            return message

        await run_or_answer(self.app, scope, limited_receive, send, BodyTooLarge, lambda exc: self._response())


DEFAULT_READ_TIMEOUT = 10.0
"""Longest wait for the next chunk of a request body (seconds)."""

DEFAULT_BODY_TIMEOUT = 30.0
"""Longest time a request body may take to arrive in full (seconds)."""


class BodyTimedOut(StarletteHTTPException):
    """Raised from ``receive`` when a request body is too slow (an ``HTTPException``, so that
    FastAPI's body parsing lets it through instead of answering 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=408, detail=detail, headers={"Connection": "close"})


class BodyTimeout:
    """ASGI middleware: a request body that stalls for more than ``read_timeout`` seconds
    between chunks, or is not complete ``body_timeout`` seconds after the request started, is
    answered 408 (``Connection: close``) when no response was started yet.

    Uvicorn itself waits for a body forever, so a client trickling one byte every few seconds
    would hold a connection, a request and its buffers for as long as it likes. Once the body
    is complete, ``receive`` (which then only reports a disconnect) is passed through untimed.
    ``None`` or ``0`` turns a limit off.
    """

    def __init__(self, app: Any, read_timeout: float | None = DEFAULT_READ_TIMEOUT,
                 body_timeout: float | None = DEFAULT_BODY_TIMEOUT) -> None:
        self.app = app
        self.read_timeout = float(read_timeout) if read_timeout else None
        self.body_timeout = float(body_timeout) if body_timeout else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (self.read_timeout is None and self.body_timeout is None):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout if self.body_timeout is not None else None
        complete = False

        async def timed_receive() -> Any:
            nonlocal complete
            if complete:
                return await receive()
            limits = [t for t in (self.read_timeout, None if deadline is None else deadline - loop.time())
                      if t is not None]
            wait = min(limits)
            if wait <= 0:
                raise BodyTimedOut(f"request body timed out: not complete within {self.body_timeout:g} s")
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                if deadline is not None and loop.time() >= deadline - 1e-3:
                    raise BodyTimedOut(f"request body timed out: not complete within {self.body_timeout:g} s") \
                        from None
                raise BodyTimedOut(f"request body timed out: no data for {self.read_timeout:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await run_or_answer(self.app, scope, timed_receive, send, BodyTimedOut,
                            lambda exc: JSONResponse({"detail": exc.detail}, status_code=408,
                                                     headers={"Connection": "close"}))


class SecurityHeaders:
    """ASGI middleware: ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
    ``Referrer-Policy: no-referrer`` and a ``Content-Security-Policy`` on every response.

    ``csp`` is the policy of every path, except where ``csp_for(path)`` returns another one
    (the API docs page runs Swagger UI's inline start-up script). A header the app set itself
    is left as it is.
    """

    def __init__(self, app: Any, csp: str, csp_for: Callable[[str], str | None] | None = None) -> None:
        self.app = app
        self.csp = csp
        self.csp_for = csp_for

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = (self.csp_for(scope.get("path", "")) if self.csp_for is not None else None) or self.csp

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", ()))
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Content-Security-Policy", csp)
            await send(message)

        await self.app(scope, receive, send_with_headers)


__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_READ_TIMEOUT", "WRITE_ROUTE", "BodyLimit", "BodyTimedOut",
           "BodyTimeout", "BodyTooLarge", "SecurityHeaders", "WriteGuard", "header_value"]
