"""ASGI middlewares of the service: the write guard and the request body limit.

They are plain ASGI callables (not ``BaseHTTPMiddleware``), so they see a request before
FastAPI reads its body, and wrap ``receive`` to watch the body as it arrives.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
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
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.upload_limit)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._response()(scope, receive, send)


__all__ = ["WRITE_ROUTE", "BodyLimit", "BodyTooLarge", "WriteGuard", "header_value"]
